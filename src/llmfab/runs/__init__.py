"""A pipeline run: planned once (`plan_run`), carried out by one of three executors, each returning a
`PipelineResult`: `InProcess` (this Python), `KfpLocal` (the Kubeflow pipeline under kfp.local), `KfpServer` (a
Kubeflow Pipelines server)."""

from llmfab.runs.inprocess import InProcess
from llmfab.runs.kfp_local import KfpLocal
from llmfab.runs.kfp_server import KfpServer
from llmfab.runs.plan import RunPlan, TrackingSettings, plan_run
from llmfab.runs.result import PipelineResult, StepRun

__all__ = ["InProcess", "KfpLocal", "KfpServer", "PipelineResult", "RunPlan", "StepRun", "TrackingSettings", "plan_run"]
