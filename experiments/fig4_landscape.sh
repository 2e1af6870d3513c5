#!/usr/bin/env bash
# Fig. 4: VGG's loss landscape along the gradient, none vs BN at lr 0.1 (Fig. 1's runs).
# usage: experiments/fig4_landscape.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig4 vgg
figure 4
