"""Quality benchmark on Fashion-MNIST: fxprune criteria vs Torch-Pruning (see README.md)."""
