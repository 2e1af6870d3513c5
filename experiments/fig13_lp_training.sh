#!/usr/bin/env bash
# Fig. 13: training under every normalisation, VGG and DLN (Figs. 11 and 12's runs).
# usage: experiments/fig13_lp_training.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig13_vgg vgg
sweep fig13_dln dln
figure 13
