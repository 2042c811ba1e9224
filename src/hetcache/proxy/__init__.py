"""The proxy model: a small Wan2.1-VACE-style inpainter trained on clips made in code (docs/PROXY.md).

`scenes` makes the clips, `architecture` fixes the model and the inputs the pipeline builds, `train` trains it,
`export` writes the package folder that `--model proxy` loads, `quality` and `report` measure it.
"""
