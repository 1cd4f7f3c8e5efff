"""KubeRay manifests parse, and their Serve config is a valid Serve deploy schema for our app."""

import yaml

from conftest import ROOT


def test_rayservice_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    from serve.app import deployment_names

    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    names = {d.name for d in app.deployments}
    assert names == set(deployment_names(app.args["preset"])) == {"ingress", "encode", "diffuse"}
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_entrypoint_parses_with_our_cli():
    from jobs.cli import build_parser

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "pidray"
    args = build_parser().parse_args(argv[1:])
    assert args.src.startswith("s3://") and args.resume and args.preset == "flux-2k"
