#!/usr/bin/env bash
# Fig. 14: distributions of VGG's layer #11 under every normalisation (Fig. 11's runs).
# usage: experiments/fig14_lp_distributions.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig14 vgg
figure 14
