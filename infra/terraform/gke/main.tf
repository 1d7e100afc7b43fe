# A GKE cluster for llmfab: a CPU pool for the platform, an autoscaled GPU pool for TrainJobs, and two
# buckets that llmfab and MLflow reach through GCS's S3-compatible XML API with an HMAC key.

locals {
  store_bucket  = "${var.project_id}-llmfab-store"
  mlflow_bucket = "${var.project_id}-llmfab-mlflow"
}

resource "google_container_cluster" "llmfab" {
  name     = var.cluster_name
  location = var.zone

  # Node pools are managed below, not as the cluster's default pool.
  remove_default_node_pool = true
  initial_node_count       = 1

  release_channel {
    channel = "REGULAR"
  }

  # Dataplane V2 enforces the NetworkPolicies in manifests/.
  datapath_provider = "ADVANCED_DATAPATH"
  networking_mode   = "VPC_NATIVE"
  ip_allocation_policy {}

  addons_config {
    gce_persistent_disk_csi_driver_config {
      enabled = true
    }
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  deletion_protection = var.deletion_protection
}

resource "google_container_node_pool" "system" {
  name     = "system"
  cluster  = google_container_cluster.llmfab.id
  location = var.zone

  autoscaling {
    min_node_count = 1
    max_node_count = 3
  }

  node_config {
    machine_type = var.system_machine_type
    disk_size_gb = 100
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    labels = {
      "llmfab.dev/pool" = "system"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

resource "google_container_node_pool" "gpu" {
  name     = "gpu"
  cluster  = google_container_cluster.llmfab.id
  location = var.zone

  autoscaling {
    min_node_count = 0
    max_node_count = var.gpu_max_nodes
  }

  node_config {
    machine_type = var.gpu_machine_type
    spot         = var.gpu_spot
    disk_size_gb = 200
    disk_type    = "pd-ssd"
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = var.gpu_type
      count = var.gpu_count
      # GKE installs the NVIDIA driver and device plugin itself.
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # GKE taints GPU nodes nvidia.com/gpu=present:NoSchedule itself: only pods that tolerate it (the
    # prod runtimes) land there.
    labels = {
      "llmfab.dev/pool" = "gpu"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

resource "google_storage_bucket" "store" {
  name                        = local.store_bucket
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
}

resource "google_storage_bucket" "mlflow" {
  name                        = local.mlflow_bucket
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
}

# The S3 identity of llmfab's stages and MLflow: read and write on the two buckets, nothing else.
resource "google_service_account" "s3" {
  account_id   = "${var.cluster_name}-s3"
  display_name = "llmfab S3 access (HMAC)"
}

resource "google_storage_bucket_iam_member" "s3" {
  for_each = {
    store  = google_storage_bucket.store.name
    mlflow = google_storage_bucket.mlflow.name
  }
  bucket = each.value
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.s3.email}"
}

resource "google_storage_hmac_key" "s3" {
  service_account_email = google_service_account.s3.email
}
