output "get_credentials" {
  description = "Points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.llmfab.name} --zone ${var.zone} --project ${var.project_id}"
}

output "mlflow_env" {
  description = "manifests/overlays/prod/params/mlflow.env: where the MLflow server keeps artifacts."
  value       = <<-EOT
    MLFLOW_ARTIFACTS_DESTINATION=s3://${google_storage_bucket.mlflow.name}/artifacts
    MLFLOW_S3_ENDPOINT_URL=https://storage.googleapis.com
    AWS_DEFAULT_REGION=auto
  EOT
}

output "llmfab_env" {
  description = "manifests/overlays/prod/params/llmfab.env: the store and S3 endpoint of llmfab's stages."
  value       = <<-EOT
    LLMFAB_STORE=s3://${google_storage_bucket.store.name}/store
    AWS_ENDPOINT_URL_S3=https://storage.googleapis.com
    MLFLOW_S3_ENDPOINT_URL=https://storage.googleapis.com
    AWS_DEFAULT_REGION=auto
  EOT
}

output "s3_credentials_env" {
  description = "manifests/overlays/prod/secrets/s3.env: the HMAC key as AWS-style credentials."
  sensitive   = true
  value       = <<-EOT
    AWS_ACCESS_KEY_ID=${google_storage_hmac_key.s3.access_id}
    AWS_SECRET_ACCESS_KEY=${google_storage_hmac_key.s3.secret}
  EOT
}
