#!/bin/sh
# Starts the MLflow tracking server of the kfp-grpo chart: `exec mlflow server "$@"`,
# plus the basic-auth app when KFP_GRPO_AUTH_ENABLED=true.
#
# The basic-auth user store reads its database URI only from an ini file, and that
# URI carries the database password from a Secret, so the file cannot be rendered by
# Helm: it is written here, at start-up, into a private temporary directory.
# Expected environment: MLFLOW_BACKEND_STORE_URI (the server reads it too),
# MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY,
# KFP_GRPO_AUTH_DEFAULT_PERMISSION.
set -eu

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
  echo "mlflow-server.sh: MLFLOW_BACKEND_STORE_URI is not set" >&2
  exit 64
fi

if [ "${KFP_GRPO_AUTH_ENABLED:-true}" = "true" ]; then
  for var in MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD; do
    eval "value=\${$var:-}"
    if [ -z "$value" ]; then
      echo "mlflow-server.sh: basic auth is enabled but $var is empty" >&2
      exit 64
    fi
  done
  umask 077
  conf_dir=$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")
  # configparser treats % as interpolation: escape it (percent-encoded passwords).
  auth_db_uri=$(printf '%s' "${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}" | sed 's/%/%%/g')
  cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${KFP_GRPO_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_db_uri}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
  set -- "$@" --app-name basic-auth
fi

exec mlflow server "$@"
