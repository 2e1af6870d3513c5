#!/usr/bin/env bash
# Fig. 12: the DLN with none, BN, L1, L2, Linf: training loss and landscape.
# usage: experiments/fig12_lp_dln.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig12 dln
figure 12
