"""Kubeflow Pipelines: a component per stage, a pipeline per family, local runs (kfp.local) and submission.

components.py  one lightweight KFP component per registered stage (its own image as base_image)
pipelines.py   a family pipeline built from its recipe; kfp-kubernetes settings; compiling to YAML
runtime.py     what a component runs inside its container (imports only llmfab, never kfp.dsl)
local.py       `llmfab run`: the pipeline under kfp.local's SubprocessRunner, nested in one MLflow run
submit.py      `llmfab submit`: upload and start (or schedule) a pipeline on a KFP server
"""
