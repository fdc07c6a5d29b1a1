"""Many GPUs / nodes through torch.distributed: one process per GPU (or CPU worker) started by torchrun.

context: process group from torchrun's environment; pool: particle batches handed out on demand;
collectives: accumulators, per-particle results and the model state shared between ranks.
"""
