#!/usr/bin/env bash
# Fig. 8: distributions of layers #1, #11, #24 of the DLN with BN.
# usage: experiments/fig8_dln_distributions.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig8 dln
figure 8
