"""Dev tools, outside the runtime: no module that runs a model imports them (tests/test_structure.py).

  make_tiny.py   `glm52 make-tiny`: random checkpoints in the real GLM-5.2 format (BF16, block-FP8,
                 msModelSlim AscendV1 W8A8 / W4A8), written all or nothing
  train_tiny.py  trains the embedded default model (glm52_backends/default_model):
                 `python -m glm52_backends.devtools.train_tiny --out DIR`
"""
