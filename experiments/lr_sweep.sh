#!/usr/bin/env bash
# BN tolerates a broader range of learning rates: none vs BN over a learning-rate grid, 3 seeds, VGG, DLN, MLP.
# usage: experiments/lr_sweep.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep lr_sweep_vgg vgg _lr_sweep
sweep lr_sweep_dln dln _lr_sweep
sweep lr_sweep_mlp mlp _lr_sweep
figure lr_sweep
