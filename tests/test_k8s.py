"""KubeRay manifests parse, and their Serve config is a valid Serve deploy schema for our app."""

import yaml

from conftest import ROOT


def test_rayservice_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
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

    job = yaml.safe_load((ROOT / "k8s" / "base" / "rayjob.yaml").read_text())
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "pidray"
    args = build_parser().parse_args(argv[1:])
    assert args.src.startswith("s3://") and args.resume and args.preset == "flux-2k"


def test_rayjob_actors_fit_the_gpus_its_cluster_has():
    """Issue 11: the job's actors, with the graph's GPU shares, must fit the worker group's GPUs."""
    from pidray.cli import build_parser
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    job = yaml.safe_load((ROOT / "k8s" / "base" / "rayjob.yaml").read_text())
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

    svc = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
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


# ------------------------------------------------------------------------------------ issue 15: the manifests
import copy  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

CRDS = ROOT.parent / "shared" / "kuberay-crds"
KINDS = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
OVERLAYS = ("small", "large")


def _json_schema(node):
    """A CRD's openAPIV3Schema as JSON Schema, strict: an object that lists its properties takes no others (unless it
    says x-kubernetes-preserve-unknown-fields), int-or-string is either, nullable adds null."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **{k: v for k, v in out.items() if k != "anyOf"}}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def validators():
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    out = {}
    for kind, name in KINDS.items():
        crd = yaml.safe_load((CRDS / name).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _json_schema(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's own schema
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def _errors(validators, doc) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def _rendered(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here: the overlays cannot be rendered")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _base() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "k8s" / "base").glob("ray*.yaml"))]


def _all_docs():
    yield "base", _base()
    for o in OVERLAYS:
        yield o, _rendered(o)


def test_every_manifest_and_rendered_overlay_validates_against_the_kuberay_crds(validators):
    for where, docs in _all_docs():
        assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob", "RayService"], where
        for doc in docs:
            assert _errors(validators, doc) == [], (where, doc["kind"])


def test_the_crd_check_catches_a_misspelt_or_misplaced_field(validators):
    job = next(d for d in _base() if d["kind"] == "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # misspelt
    assert any("maxReplica" in e for e in _errors(validators, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt at the top
    assert any("shutdownAfterJobFinish" in e for e in _errors(validators, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"  # wrong type
    assert _errors(validators, bad)


def test_serve_config_inside_every_rayservice_is_serve_config_yaml():
    want = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    for where, docs in _all_docs():
        svc = next(d for d in docs if d["kind"] == "RayService")
        assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == want, f"{where}: copy serve/config.yaml into it"


def test_ray_versions_agree_image_pyproject_manifests():
    import re

    pin = re.search(r'"ray\[serve,data\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base_image = re.search(r"^FROM rayproject/ray:([\d.]+)-", (ROOT / "k8s" / "Dockerfile").read_text(), re.M)
    assert base_image.group(1) == pin
    for where, docs in _all_docs():
        for d in docs:
            spec = d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]
            assert spec["rayVersion"] == pin, (where, d["kind"])


def test_entrypoints_and_import_paths_exist_and_jobs_fit_their_workers():
    """Every RayJob entrypoint parses with our CLI and its actors (with the graph's GPU shares) fit the GPUs of its
    worker groups; the Serve import path imports; the image's health check is a real doctor step."""
    import importlib
    import re

    from pidray.cli import build_parser
    from pipeline.doctor import STEPS
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    for where, docs in _all_docs():
        job = next(d for d in docs if d["kind"] == "RayJob")
        argv = job["spec"]["entrypoint"].split()
        assert argv[0] == "pidray"
        args = build_parser().parse_args(argv[1:])
        assert args.resume and args.src.startswith("s3://")
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   * g["minReplicas"] for g in groups)  # fmt: skip
        graph = StageGraph(ModelOptions(preset=args.preset))
        asked = {k: v for k, v in (("encode", args.encode_actors), ("diffuse", args.diffuse_actors)) if v}
        need = graph.gpus_needed(graph.actors(gpus, asked))
        assert need <= gpus, (where, need, gpus)
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert {"shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"} <= set(
            job["spec"]
        )
        svc = next(d for d in docs if d["kind"] == "RayService")
        app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    health = re.search(r'HEALTHCHECK .*CMD \["pidray", "doctor", "--steps", "([\w,]+)"',
                       (ROOT / "k8s" / "Dockerfile").read_text(), re.S)  # fmt: skip
    assert health and set(health.group(1).split(",")) <= set(STEPS)


def test_token_is_required_and_no_credentials_are_written_in_manifests():
    for where, docs in _all_docs():
        svc = next(d for d in docs if d["kind"] == "RayService")
        cluster = svc["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        for pod in pods:
            env = {e["name"]: e for c in pod["template"]["spec"]["containers"] for e in c.get("env", [])}
            ref = env["PIDRAY_API_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "pidray-api" and not ref.get("optional", False), where
        for d in docs:
            text = yaml.safe_dump(d)
            for e in _walk_env(d):
                if any(w in e["name"].upper() for w in ("KEY", "SECRET", "TOKEN", "PASSWORD")):
                    assert "value" not in e, (where, e["name"])  # from a Secret, never a literal
            assert "aws_secret_access_key" not in text.lower()


def _walk_env(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield from (e for e in v if isinstance(e, dict))
            else:
                yield from _walk_env(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_env(v)


def test_the_large_overlay_scales_and_fetches_weights_into_a_node_local_cache():
    docs = {d["kind"]: d for d in _rendered("large")}
    svc_group = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert svc_group["minReplicas"] < svc_group["maxReplicas"] == 16
    assert docs["RayService"]["spec"]["rayClusterConfig"]["autoscalerOptions"]["version"] == "v2"
    job_group = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert job_group["minReplicas"] == job_group["maxReplicas"] == 16
    init = job_group["template"]["spec"]["initContainers"][0]
    assert "pidray download flux-2k" in " ".join(init["command"]) and init["image"].startswith("ghcr.io/")
    assert {"name": "models", "emptyDir": {"sizeLimit": "80Gi"}} in job_group["template"]["spec"]["volumes"]


def test_serve_config_deployment_options_are_typed_and_drain_within_the_deadline():
    """serve/config.yaml's per-deployment overrides (Serve lays them over the builder's) pass the endpoint's typed
    DeploymentArgs, which Serve's own schema does not do for autoscaling keys (a misspelt one is silently dropped),
    and no drain window is shorter than the request deadline, so a scale-down lets in-flight requests finish."""
    from serve.app import AppArgs, deployment_names
    from serve.deployments import deployment_options

    app = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    args = AppArgs.model_validate({**app["args"], "deployments": overrides})
    assert set(args.deployments) == set(deployment_names(args.preset))
    assert args.deployments["diffuse"].autoscaling_config["max_replicas"] > 1
    for name in args.deployments:
        drain = deployment_options(name, args.deployments, args.timeout_s)["graceful_shutdown_timeout_s"]
        assert drain >= args.timeout_s, (name, drain)
