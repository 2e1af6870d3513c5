#!/usr/bin/env bash
# Fig. 10: gradient predictiveness against the step size over training, VGG and DLN (Figs. 4 and 9's runs).
# usage: experiments/fig10_predictiveness.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig10_vgg vgg
sweep fig10_dln dln
figure 10
