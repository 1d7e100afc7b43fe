-- MLflow's basic-auth app keeps its users in a database of its own: its migrations use the same
-- alembic version table name as the tracking schema's, so the two cannot share one database.
CREATE DATABASE mlflow_auth;
