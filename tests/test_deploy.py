"""The deployment files, checked without a container engine or a cluster (none runs here).

- every kustomize overlay renders (`kubectl kustomize`) and every object it makes validates
  against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors);
- docker-compose.yml validates against the Compose specification (check-jsonschema's copy);
- they agree with the programs: every SHAREDLLM_* variable a container sets is a flag of the
  command it runs, ports, probes and health checks name the services' ports, grace periods
  outlast the drain, the GPU overlay asks for GPUs;
- the commands the compose file runs are started as processes with its environment (hosts and
  ports pointed at loopback, the tiny model instead of the default one), pass the compose
  health check, and answer through the worker.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import stop_all
from redis_server import free_port

from sharedllm.cli import build_parser
from sharedllm.common.batch.client import BatchClient, read_documents
from sharedllm.common.batch.jobs import JobSpec
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.32"
PORTS = {"compressor": COMPRESSOR.default_port, "decoder": DECODER.default_port}
NOT_FLAGS = {"SHAREDLLM_CACHE_DIR"}  # read by model loading, not a flag
CUSTOM_RESOURCE_GROUPS = {"keda.sh", "monitoring.coreos.com"}  # KEDA and the Prometheus Operator
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")


def render(overlay: Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def env_names(argv: list[str]) -> set[str]:
    """The SHAREDLLM_* variables the command in `argv` reads: one per flag of its own parser
    (server_options.apply_env_defaults), found by following argv's words down the subcommands."""
    parser = build_parser(argv)
    for word in argv:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None or word not in commands.choices:
            break
        parser = commands.choices[word]
    flags = (s for action in parser._actions for s in action.option_strings if s.startswith("--"))
    return {"SHAREDLLM_" + flag[2:].upper().replace("-", "_") for flag in flags}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) is not installed")
    return request.param, render(ROOT / "k8s" / "overlays" / request.param)


def objects(rendered: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered if o["kind"] == kind}


@needs_kubectl
def test_every_object_of_every_overlay_is_valid_kubernetes(overlay):
    import kubernetes_validate

    name, rendered = overlay
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", "ConfigMap", "Secret", "Namespace"} <= kinds
    # The CPU overlay scales on CPU; the GPU overlay on queue depth, through KEDA (checked below).
    assert ("HorizontalPodAutoscaler" in kinds) == (name == "cpu")
    for obj in rendered:
        assert obj["metadata"].get("namespace", "sharedllm") == "sharedllm"
        if obj["apiVersion"].split("/")[0] in CUSTOM_RESOURCE_GROUPS:
            continue  # not in the Kubernetes API schemas: test_gpu_autoscaling_reads_queue_depth
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@needs_kubectl
def test_the_external_redis_component_replaces_the_statefulset(tmp_path):
    import kubernetes_validate

    overlay = tmp_path / "external"
    overlay.mkdir()
    cpu, component = (os.path.relpath(ROOT / "k8s" / p, overlay) for p in ("overlays/cpu", "components/external-redis"))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{cpu}]\ncomponents: [{component}]\n"  # kustomize takes relative paths only
    )
    rendered = render(overlay)
    assert "redis" not in objects(rendered, "StatefulSet") and "redis" not in objects(rendered, "Service")
    for name in ("compressor", "decoder", "worker"):
        env = objects(rendered, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]["env"]
        wanted = "SHAREDLLM_BROKER_URL" if name == "worker" else "SHAREDLLM_STORE_URL"
        assert any(e["name"] == wanted and e["valueFrom"]["secretKeyRef"]["name"] == "sharedllm-redis" for e in env)
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@needs_kubectl
def test_manifests_agree_with_the_programs(overlay):
    name, rendered = overlay
    config_maps = objects(rendered, "ConfigMap")
    services = objects(rendered, "Service")
    for deployment in objects(rendered, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []):
            assert container["args"] == ["model", "prepare"]
        (container,) = pod["containers"]
        argv = container["args"]
        build_parser(argv)  # a real command
        allowed = env_names(argv) | NOT_FLAGS
        env = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            env |= set(config_maps[source["configMapRef"]["name"]]["data"])
        assert env - allowed == set(), f"{deployment['metadata']['name']} sets variables no flag reads"
        if argv[0] == "serve":
            port = PORTS[argv[1]]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["grpc"] == port
            assert {"name": "SHAREDLLM_PORT", "value": str(port)} in container["env"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == port  # native gRPC health probes
            assert services[argv[1]]["spec"]["ports"][0]["port"] == port
            serve = config_maps["sharedllm-serve"]["data"]
            pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
            drain = pause + float(serve["SHAREDLLM_DRAIN_DELAY_S"]) + float(serve["SHAREDLLM_SHUTDOWN_GRACE_S"])
            assert pod["terminationGracePeriodSeconds"] > drain
            gpu = "nvidia.com/gpu" in container["resources"]["limits"]
            assert gpu == (name == "gpu")
            if gpu:
                assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
                assert container["image"].endswith(":cuda")
                assert {"name": "SHAREDLLM_DTYPE", "value": "bfloat16"} in container["env"]
            else:
                assert container["image"].endswith(":cpu")
        if "SHAREDLLM_METRICS_PORT" in env:  # the port Prometheus scrapes is the one the program serves
            settings = {**config_maps[container["envFrom"][0]["configMapRef"]["name"]]["data"]}
            metrics_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
            assert metrics_ports == [int(settings["SHAREDLLM_METRICS_PORT"])]
    worker = objects(rendered, "ConfigMap")["sharedllm-worker"]["data"]
    assert worker["SHAREDLLM_COMPRESSOR"] == f"compressor:{PORTS['compressor']}"
    assert worker["SHAREDLLM_DECODER"] == f"decoder:{PORTS['decoder']}"


@needs_kubectl
def test_gpu_autoscaling_reads_queue_depth():
    """KEDA scales the decoder and compressor on requests in flight, queued ones included (metrics
    the services export, scraped by the PodMonitor), and the worker on the Celery queues' lengths
    (the lists the broker keeps, in the broker's database, which KEDA may reach)."""
    from prometheus_client import REGISTRY

    from sharedllm.common.batch.app import COMPRESS_QUEUE, GENERATE_QUEUE
    from sharedllm.common.telemetry import metrics  # noqa: F401  (registers the metrics)

    rendered = render(ROOT / "k8s" / "overlays" / "gpu")
    deployments = objects(rendered, "Deployment")
    scaled = objects(rendered, "ScaledObject")
    assert set(scaled) == {"decoder", "compressor", "worker"}
    exported = {m.name for m in REGISTRY.collect()} | {f"{m.name}_total" for m in REGISTRY.collect()}
    broker = objects(rendered, "ConfigMap")["sharedllm-worker"]["data"]["SHAREDLLM_BROKER_URL"]
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["spec"]["scaleTargetRef"]["name"] in deployments
        assert 1 <= obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] == "prometheus":
                names = set(re.findall(r"\b(sharedllm_[a-z_]+)\{", meta["query"]))
                assert names and names <= exported, names - exported
                assert "sharedllm_requests_in_flight" in names and float(meta["threshold"]) > 0
            else:
                assert name == "worker" and trigger["type"] == "redis"
                assert meta["listName"] in (COMPRESS_QUEUE, GENERATE_QUEUE)
                assert broker.endswith("/" + meta["databaseIndex"])
    assert {t["metadata"].get("listName") for t in scaled["worker"]["spec"]["triggers"]} == {
        COMPRESS_QUEUE,
        GENERATE_QUEUE,
    }
    (monitor,) = objects(rendered, "PodMonitor").values()
    assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/name"]
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}
    policies = objects(rendered, "NetworkPolicy")
    assert policies["metrics-from-monitoring"]["spec"]["ingress"][0]["ports"] == [{"port": 9100, "protocol": "TCP"}]
    keda = policies["redis-from-keda"]["spec"]
    assert keda["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "redis"
    assert keda["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    for obj in scaled.values():  # scale-down waits are set where KEDA applies them (cooldown is for 0)
        assert "cooldownPeriod" not in obj["spec"]
        assert obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_agrees_with_the_programs_and_the_image():
    services = compose()["services"]
    for name in ("compressor", "decoder"):
        service = services[name]
        port = PORTS[name]
        assert service["command"] == ["serve", name] and service["ports"] == [f"{port}:{port}"]
        assert service["healthcheck"]["test"] == ["CMD", "sharedllm", "health", "--target", f"localhost:{port}"]
        assert set(service["environment"]) - env_names(["serve", name]) == set()
    assert set(services["worker"]["environment"]) - env_names(["worker"]) == set()
    assert services["worker"]["command"][:1] == ["worker"]
    assert services["model-init"]["command"] == ["model", "prepare"]
    assert "noeviction" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 50051 50052$", dockerfile, re.M)
    assert 'ENTRYPOINT ["sharedllm"]' in dockerfile and re.search(r"^USER sharedllm$", dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"


def test_the_compose_commands_run_as_processes(tiny_model_dir, tiny_adapter, make_redis_server, tmp_path):
    """compressor, decoder and worker as compose starts them (same command, same environment),
    with hosts pointed at loopback and the tiny model: healthy by the compose health check, and
    a batch job goes through the worker to both services."""
    redis = make_redis_server()
    services = compose()["services"]
    ports = {name: free_port() for name in PORTS}
    loopback = {f"{name}:{port}": f"127.0.0.1:{ports[name]}" for name, port in PORTS.items()}
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SHAREDLLM_TORCH_THREADS": "1"}
    base |= {"SHAREDLLM_MODEL": str(tiny_model_dir), "SHAREDLLM_ADAPTER": str(tiny_adapter)}

    def localised(value: str) -> str:
        value = value.replace("redis://redis:6379/0", redis.url).replace("redis://redis:6379/1", redis.url[:-1] + "1")
        for address, local in loopback.items():
            value = value.replace(address, local)
        return value

    processes = []
    try:
        for name in ("compressor", "decoder", "worker"):
            service = services[name]
            env = {**base, **{k: localised(str(v)) for k, v in service["environment"].items()}}
            if name in ports:
                env["SHAREDLLM_PORT"] = str(ports[name])
            command = [sys.executable, "-m", "sharedllm", *map(localised, service["command"])]
            log = (tmp_path / f"{name}.log").open("w")
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            if name in ports:
                check = [localised(part) for part in service["healthcheck"]["test"][1:]]
                check[check.index("--target") + 1] = f"127.0.0.1:{ports[name]}"
                assert check[0] == "sharedllm"  # the image's entry point; here, this environment's
                check[:1] = [sys.executable, "-m", "sharedllm"]
                deadline = time.monotonic() + 120
                while subprocess.run(check, capture_output=True).returncode != 0:
                    assert processes[-1].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, f"{name} not healthy"
                    time.sleep(0.5)
        document = tmp_path / "doc.txt"
        document.write_text("Naomi went with Ruth to Bethlehem. " * 60)
        client = BatchClient(redis.url[:-1] + "1")
        job = client.submit(read_documents([document]), JobSpec(None, ("Who is Naomi?",), max_new_tokens=4))
        deadline = time.monotonic() + 120
        while client.status(job).state not in ("done", "done_with_errors"):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        assert client.results(job)[0]["state"] == "done"
    finally:
        stop_all(processes)
