variable "project_id" {
  description = "GCP project that holds the cluster and the buckets."
  type        = string
}

variable "region" {
  description = "Region of the buckets and the provider's default."
  type        = string
  default     = "us-central1"
}

variable "zone" {
  description = "Zone of the cluster: a zonal cluster keeps GPU nodes and their scratch disks in one place. Pick one that offers the GPU type."
  type        = string
  default     = "us-central1-a"
}

variable "cluster_name" {
  description = "Name of the GKE cluster."
  type        = string
  default     = "llmfab"
}

variable "system_machine_type" {
  description = "Machine type of the CPU pool that runs KFP, Trainer, MLflow and Postgres."
  type        = string
  default     = "e2-standard-8"
}

variable "gpu_machine_type" {
  description = "Machine type of the GPU pool; must match gpu_type and gpu_count (manifests/overlays/prod/runtime-gpu.yaml asks for the same)."
  type        = string
  default     = "g2-standard-24"
}

variable "gpu_type" {
  description = "Accelerator type attached to each GPU node."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_count" {
  description = "GPUs per GPU node."
  type        = number
  default     = 2
}

variable "gpu_max_nodes" {
  description = "Upper bound of the GPU pool's autoscaler; it scales to zero when no TrainJob runs."
  type        = number
  default     = 4
}

variable "gpu_spot" {
  description = "Use Spot VMs for the GPU pool: much cheaper, may be preempted (llmfab's training stages resume from their last checkpoint)."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the cluster while true."
  type        = bool
  default     = true
}
