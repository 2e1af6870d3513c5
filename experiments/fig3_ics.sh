#!/usr/bin/env bash
# Fig. 3: internal covariate shift of VGG (lr 0.1, 0.01) and of the DLN (lr 1e-6, 1e-7), none vs BN.
# usage: experiments/fig3_ics.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig3_vgg vgg
sweep fig3_dln dln
figure 3
