"""The run layer: what every command that writes a work directory shares.

- `files`: atomic, durable writes of text, JSON and Keras files.
- `workdir`: one identity rule (a work directory holds a run; another run
  is refused without ``--overwrite``), its error, and the lock that keeps a
  second process out.
- `metrics`: ``metrics.jsonl``, appended line by line, cut back to a
  checkpoint when a run resumes.
- `checkpoints`: verified, fingerprinted run checkpoints, and resolving
  and loading the ``.keras`` model files a training run writes.
- `context`: `Run`, the context a search or a training run lives in: the
  lock, the preemption guard, TensorBoard, the profiler, the metrics file,
  the consecutive-skip limit and the scratch directory of a non-chief
  worker.
"""
