"""Attention kernels: passes returning (output, log-sum-exp), their merge, and the
blockwise window-plus-far-keys attention the windowed strategies run on."""
