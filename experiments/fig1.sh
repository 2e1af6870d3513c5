#!/usr/bin/env bash
# Fig. 1: VGG with and without BatchNorm at lr 0.1 and 0.5: accuracy, layers #3 and #11.
# usage: experiments/fig1.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep fig1 vgg
figure 1
