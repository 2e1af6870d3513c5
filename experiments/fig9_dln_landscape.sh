#!/usr/bin/env bash
# Fig. 9: the DLN's loss landscape along the gradient, none vs BN at lr 1e-6.
# usage: experiments/fig9_dln_landscape.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig9 dln
figure 9
