"""Transport security end to end: a real compressor over TLS and mutual TLS, real clients.

The certificates are made here (a CA, a server certificate for localhost and 127.0.0.1, a client
certificate, and a second CA that signed neither), so the tests need no files and no openssl.
A client that trusts the CA is served; one speaking plaintext, trusting another CA, expecting
another name or, for mutual TLS, presenting no certificate (or one the server's CA did not sign)
is refused with UNAVAILABLE, as any failed handshake is. The command-line flags and their
SHAREDLLM_TLS_* variables reach the channel; bad TLS configuration is one line and exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_stack import SERVING, EventLoopThread, InProcessServer, health, server_config, wait_for_health

from sharedllm.cli import main
from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.config import ConfigError
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc
from sharedllm.common.rpc.client import open_channel
from sharedllm.common.rpc.config import NetworkSettings
from sharedllm.common.rpc.server import server_credentials
from sharedllm.common.rpc.tls import ClientTls, plaintext_warning
from sharedllm.compressor_service.server import SPEC as COMPRESSOR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = "The cat sat on the mat. The dog lay by the door. " * 20
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    names: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A certificate for `subject`, signed by `issuer` (name, key), or a self-signed CA without one."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage_bits = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment"), False)
        usage_bits |= dict.fromkeys(("key_agreement", "encipher_only", "decipher_only"), False)
        key_usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage_bits)
        builder = builder.add_extension(key_usage, critical=True)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    """name.pem and name.key in `directory`; the certificate's path."""
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    directory: Path

    def pem(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def client(self, ca: str = "ca", who: str | None = None, server_name: str | None = None) -> ClientTls:
        """A client trusting CA `ca`, presenting certificate `who` (None: no certificate)."""
        if who is None:
            return ClientTls(ca=self.pem(ca), server_name=server_name)
        return ClientTls(ca=self.pem(ca), cert=self.pem(who), key=self.key(who), server_name=server_name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """ca signs server (localhost, 127.0.0.1) and client; other-ca signs only stranger."""
    directory = tmp_path_factory.mktemp("pki")
    for ca_name, signed in (("ca", ("server", "client")), ("other-ca", ("stranger",))):
        ca_key = _key()
        _write(directory, ca_name, _certificate(ca_name, ca_key), ca_key)
        for name in signed:
            key = _key()
            if name == "server":
                names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                certificate = _certificate(name, key, (ca_name, ca_key), names, ExtendedKeyUsageOID.SERVER_AUTH)
            else:
                certificate = _certificate(name, key, (ca_name, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
            _write(directory, name, certificate, key)
    return Pki(directory)


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread()
    yield thread
    thread.close()


def _tls_server(loop, tiny_model_dir, tiny_adapter, pki: Pki, *flags: str) -> InProcessServer:
    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", "memory://",
        "--tls-cert", str(pki.pem("server")), "--tls-key", str(pki.key("server")), *flags,
    )  # fmt: skip
    return InProcessServer(loop, COMPRESSOR, config)


@pytest.fixture(scope="module")
def tls_server(loop, tiny_model_dir, tiny_adapter, pki):
    with _tls_server(loop, tiny_model_dir, tiny_adapter, pki) as server:
        wait_for_health(server.target, SERVING, tls=pki.client())
        yield server


@pytest.fixture(scope="module")
def mtls_server(loop, tiny_model_dir, tiny_adapter, pki):
    with _tls_server(loop, tiny_model_dir, tiny_adapter, pki, "--tls-client-ca", str(pki.pem("ca"))) as server:
        wait_for_health(server.target, SERVING, tls=pki.client(who="client"))
        yield server


def compress(target: str, tls: ClientTls) -> cpb.StoredContext:
    with open_channel(target, tls) as channel:
        request = cpb.CompressRequest(text=DOCUMENT.encode())
        return compressor_pb2_grpc.CompressorServiceStub(channel).Compress(request, timeout=30).context


def test_tls_serves_clients_that_trust_its_ca_and_refuses_the_others(tls_server, pki):
    port = tls_server.target.rsplit(":", 1)[1]
    assert health(tls_server.target, tls=pki.client()) == SERVING
    assert health(f"localhost:{port}", tls=pki.client()) == SERVING  # the DNS name in the certificate too
    assert compress(tls_server.target, pki.client()).document_tokens > 0
    assert health(tls_server.target) == UNAVAILABLE  # plaintext
    assert health(tls_server.target, tls=pki.client(ca="other-ca")) == UNAVAILABLE  # another CA
    assert health(tls_server.target, tls=ClientTls()) == UNAVAILABLE  # the default roots do not know the test's CA
    assert health(tls_server.target, tls=pki.client(server_name="elsewhere.example")) == UNAVAILABLE  # another name
    assert health(tls_server.target, tls=pki.client(server_name="localhost")) == SERVING


def test_mutual_tls_serves_only_clients_with_a_certificate_from_its_ca(mtls_server, pki):
    assert health(mtls_server.target, tls=pki.client(who="client")) == SERVING
    assert compress(mtls_server.target, pki.client(who="client")).document_tokens > 0
    assert health(mtls_server.target, tls=pki.client()) == UNAVAILABLE  # no client certificate
    assert health(mtls_server.target, tls=pki.client(who="stranger")) == UNAVAILABLE  # signed by another CA
    assert health(mtls_server.target) == UNAVAILABLE  # plaintext


def test_the_health_command_takes_tls_flags(tls_server, pki):
    command = [sys.executable, "-m", "sharedllm", "health", "--target", tls_server.target]
    done = subprocess.run([*command, "--tls-ca", str(pki.pem("ca"))], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, f"{tls_server.target}: SERVING"), done.stderr


def test_clients_take_tls_files_from_the_environment(tls_server, mtls_server, pki, monkeypatch, capsys, tmp_path):
    assert main(["health", "--target", tls_server.target]) == 1  # plaintext by default
    assert capsys.readouterr().out.strip() == f"{tls_server.target}: UNAVAILABLE"
    monkeypatch.setenv("SHAREDLLM_TLS_CA", str(pki.pem("ca")))
    assert main(["health", "--target", tls_server.target]) == 0
    assert main(["health", "--target", mtls_server.target]) == 1  # no client certificate yet
    monkeypatch.setenv("SHAREDLLM_TLS_CERT", str(pki.pem("client")))
    monkeypatch.setenv("SHAREDLLM_TLS_KEY", str(pki.key("client")))
    capsys.readouterr()
    document = tmp_path / "doc.txt"
    document.write_text(DOCUMENT)
    assert main(["compress", "--target", mtls_server.target, str(document)]) == 0
    assert capsys.readouterr().out.strip()  # the context id


def test_bad_tls_configuration_is_one_line_and_exit_2(pki, capsys, tmp_path):
    assert main(["serve", "compressor", "--tls-cert", str(pki.pem("server"))]) == 2
    assert capsys.readouterr().err == (
        "sharedllm: error: TLS needs a certificate and its private key (--tls-cert and --tls-key); "
        "got the certificate without the private key\n"
    )
    assert main(["health", "--target", "localhost:1", "--tls-key", str(pki.key("client"))]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["health", "--target", "localhost:1", "--tls-ca", str(tmp_path / "none.pem")]) == 2
    assert capsys.readouterr().err.startswith("sharedllm: error: cannot read the TLS CA file (--tls-ca) ")
    with pytest.raises(ConfigError, match="--tls-client-ca asks clients for a certificate"):
        NetworkSettings(port=0, tls_client_ca=pki.pem("ca"))

    missing, not_pem = tmp_path / "missing.pem", tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"cannot read the TLS certificate \(--tls-cert\) .*missing.pem"):
        server_credentials(NetworkSettings(port=0, tls_cert=missing, tls_key=pki.key("server")))
    with pytest.raises(ConfigError, match=r"TLS private key \(--tls-key\) .*not.pem is not a PEM file"):
        server_credentials(NetworkSettings(port=0, tls_cert=pki.pem("server"), tls_key=not_pem))


def test_a_server_with_an_unreadable_certificate_stops_at_start_with_one_line(tmp_path):
    missing = tmp_path / "missing.pem"
    done = subprocess.run(
        [sys.executable, "-m", "sharedllm", "serve", "compressor", "--host", "127.0.0.1", "--port", "0",
         "--store-url", "memory://", "--tls-cert", str(missing), "--tls-key", str(missing)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2,
        f"sharedllm: error: cannot read the TLS certificate (--tls-cert) {missing}: No such file or directory\n",
    )


def test_serve_reads_tls_files_from_the_environment(pki, monkeypatch):
    monkeypatch.setenv("SHAREDLLM_TLS_CERT", str(pki.pem("server")))
    monkeypatch.setenv("SHAREDLLM_TLS_KEY", str(pki.key("server")))
    monkeypatch.setenv("SHAREDLLM_TLS_CLIENT_CA", str(pki.pem("ca")))
    parser = argparse.ArgumentParser()
    arguments = ServerArguments(default_port=0)
    arguments.add_arguments(parser)
    network = arguments.from_args(parser.parse_args([])).network
    assert (network.tls_cert, network.tls_key, network.tls_client_ca) == (
        pki.pem("server"),
        pki.key("server"),
        pki.pem("ca"),
    )
    assert server_credentials(network) is not None


def test_the_worker_takes_the_client_tls_settings(pki, monkeypatch):
    from sharedllm.cli import build_parser, worker

    monkeypatch.setenv("SHAREDLLM_TLS_CA", str(pki.pem("ca")))
    argv = ["worker", "--compressor", "c:1", "--decoder", "d:2", "--tls-cert", str(pki.pem("client"))]
    argv += ["--tls-key", str(pki.key("client"))]
    assert worker.TLS.from_args(build_parser(argv).parse_args(argv)) == pki.client(who="client")


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
        ("localhost", False, False),
        ("[::]", False, True),  # the default: every address
        ("0.0.0.0", False, True),
        ("10.1.2.3", False, True),
        ("compressor.internal", False, True),
        ("[::]", True, False),
    ],
)
def test_plaintext_beyond_loopback_is_warned_about(host, tls, warned):
    warning = plaintext_warning(host, tls)
    assert (warning is not None) == warned
    if warned:
        assert "unencrypted" in warning and "--tls-cert" in warning and "--tls-key" in warning
