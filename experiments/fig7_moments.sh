#!/usr/bin/env bash
# Fig. 7: moment changes of layers #2, #9, #13 for VGG none / BN / noisy BN (Fig. 2's runs).
# usage: experiments/fig7_moments.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig7 vgg
figure 7
