#!/usr/bin/env bash
# Every figure: all sweeps (each run trained once, however many figures use it), then every figure.
# usage: experiments/all.sh [scale: cpu (default) | paper | smoke] [extra overrides...]
#   e.g. on a machine without CIFAR-10/MNIST: VGG_DATA=fashion_mnist MLP_DATA=fashion_mnist JOBS=2 experiments/all.sh cpu
# Interrupted? Run it again: finished runs are skipped, the others resume from their checkpoints.
source "$(dirname "$0")/common.sh" "$@"
for experiment in fig1 fig2 fig3_vgg fig11; do sweep $experiment vgg; done  # covers Figs. 4, 7, 10, 13, 14 too
for experiment in fig3_dln fig12 fig8; do sweep $experiment dln; done         # covers Figs. 9, 10, 13 too
sweep is_fig1 mlp
sweep lr_sweep_vgg vgg _lr_sweep
sweep lr_sweep_dln dln _lr_sweep
sweep lr_sweep_mlp mlp _lr_sweep
figure all
