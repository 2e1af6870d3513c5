#!/usr/bin/env bash
# Ioffe & Szegedy Fig. 1: the sigmoid MLP with and without BN: test accuracy, percentiles of a sigmoid input.
# usage: experiments/is_fig1_mlp.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
source "$(dirname "$0")/common.sh" "$@"
sweep is_fig1 mlp
figure is1
