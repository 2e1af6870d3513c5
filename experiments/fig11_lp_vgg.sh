#!/usr/bin/env bash
# Fig. 11: VGG with none, BN, L1, L2, Linf: training accuracy and landscape.
# usage: experiments/fig11_lp_vgg.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig11 vgg
figure 11
