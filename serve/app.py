"""The online endpoint, as Serve imports it (`serve.app:build_app`, the import path of serve/config.yaml and k8s/).

serve/builder.py      AppArgs and build_app: the workflows each route runs, resolved once; one deployment per
                      model-holding stage
serve/routes.py       the ingress: FastAPI routes, each route's stage chain (deployments chained unawaited)
serve/admission.py    token, Origin/Host, the body bounded in bytes, time and rate, uploads counted apart from work
serve/params.py       query/form parameters and JSON fields, typed; the cost model (pixels × steps)
serve/deployments.py  StageDeployment (a stage in a replica, batched in tiles) and per-deployment Serve options
"""

from serve.builder import AppArgs, build_app, deployment_names
from serve.params import check_json_fields, parse_params
from serve.routes import Ingress, app

__all__ = ["AppArgs", "Ingress", "app", "build_app", "check_json_fields", "deployment_names", "parse_params"]
