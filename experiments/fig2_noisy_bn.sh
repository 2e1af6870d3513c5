#!/usr/bin/env bash
# Fig. 2: VGG without norm, with BN and with noisy BN at lr 0.1 (the none/BN runs are Fig. 1's).
# usage: experiments/fig2_noisy_bn.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig2 vgg
figure 2
