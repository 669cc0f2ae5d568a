"""Running the study's (method, seed) runs somewhere else than in `cclnb study`'s own process.

- `torchrun`: the task-sequence notebook trains in one process per GPU under torchrun;
- `resources`: what a cluster job asks for (nodes, GPUs, CPUs, memory, time) and the checks made
  before anything is submitted;
- `job`: one (method, seed) as a submitit job, checkpointed and requeued when SLURM stops it;
- `cluster`: submitting the unfinished (method, seed) pairs, watching them, joining the records.

Only `torchrun` is imported by the notebooks; the other modules need the `cluster` extra
(submitit, psutil). May import every earlier stage (data, training, evaluate, study); never
`cclnb.commands`.
"""
