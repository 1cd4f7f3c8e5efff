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
    from pidray.cli import build_parser

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "pidray"
    args = build_parser().parse_args(argv[1:])
    assert args.src.startswith("s3://") and args.resume and args.preset == "flux-2k"


def test_rayjob_actors_fit_the_gpus_its_cluster_has():
    """Issue 11: the job's actors, with the graph's GPU shares, must fit the worker group's GPUs."""
    from pidray.cli import build_parser
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    args = build_parser().parse_args(job["spec"]["entrypoint"].split()[1:])
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])  # fmt: skip
    graph = StageGraph(ModelOptions(preset=args.preset))
    asked = {"encode": args.encode_actors, "diffuse": args.diffuse_actors}
    actors = graph.actors(gpus, {k: v for k, v in asked.items() if v})
    assert graph.gpus_needed(actors) <= gpus, (actors, graph.gpus_needed(actors), gpus)
    assert graph.gpus_needed(graph.actors(gpus)) <= gpus  # the defaults fit any cluster too


def test_rayservice_gpu_shares_follow_the_graph():
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    svc = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    graph = StageGraph(ModelOptions(preset=app["args"]["preset"]))
    shares = {
        d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"] if d["name"] != "ingress"
    }
    assert shares == {s.name: s.gpu_share for s in graph.model_stages()}


def test_the_image_installs_the_same_pins_as_pyproject():
    """Issue 12 (8): one set of pins for the CPU machines and a CUDA one: torch and triton in the Dockerfile are
    pyproject's, and triton is the version torch 2.13.0's CUDA wheel requires."""
    import re

    pins = dict(re.findall(r'"(torch|triton)==([\d.]+)"', (ROOT / "pyproject.toml").read_text()))
    docker = dict(re.findall(r'"(torch|triton)==([\d.]+)"', (ROOT / "k8s" / "Dockerfile").read_text()))
    assert docker == {"torch": pins["torch"], "triton": pins["triton"]}
    assert (pins["torch"], pins["triton"]) == ("2.13.0", "3.7.1")
