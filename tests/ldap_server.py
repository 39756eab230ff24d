"""A real OpenLDAP `slapd` (Debian's package) for the tests: a generated directory on free loopback
ports, plain LDAP and LDAPS (a CA and a certificate for 127.0.0.1 made here), with the `memberof`
overlay so that group membership shows on users as `memberOf`, as in most directories."""

from __future__ import annotations

import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from tests import certificates
from tests.conftest import free_port, stop

SLAPD = "/usr/sbin/slapd"
BASE = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE}"
ADMIN_PASSWORD = "directory-admin-pw"
SERVICE_DN = f"cn=gateway,{BASE}"
SERVICE_PASSWORD = "service-account-pw"
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
PASSWORDS = {"alice": "alice-ldap-pw", "bob": "bob-ldap-pw", "carol": "carol-ldap-pw"}
MEMBERS = {"backend": ["alice", "carol"], "frontend": ["bob"]}


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server-key.pem) for 127.0.0.1."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificates.certificate("test directory CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificates.certificate(
        "127.0.0.1", key, signer=(ca, ca_key), names=["localhost"], addresses=["127.0.0.1"]
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
    )
    ca_path.write_bytes(certificates.pem(ca))
    cert_path.write_bytes(certificates.pem(cert))
    key_path.write_bytes(certificates.key_pem(key))
    return ca_path, cert_path, key_path


@dataclass
class Directory:
    root: Path
    port: int
    tls_port: int
    ca: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_addr(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        # -d keeps slapd in the foreground, so the PID is ours to stop.
        with (self.root / "slapd.log").open("ab") as log:
            self.process = subprocess.Popen(
                [SLAPD, "-f", str(self.root / "slapd.conf"), "-h", urls, "-d", "0"], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("slapd exited:\n" + (self.root / "slapd.log").read_text()[-3000:])
            probe = subprocess.run(
                [
                    "ldapsearch",
                    "-x",
                    "-H",
                    f"ldap://{self.addr}",
                    "-b",
                    BASE,
                    "-s",
                    "base",
                    "(objectClass=*)",
                ],
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("slapd did not come up")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def modify(self, ldif: str) -> None:
        done = subprocess.run(
            [
                "ldapmodify",
                "-x",
                "-H",
                f"ldap://{self.addr}",
                "-D",
                ADMIN_DN,
                "-y",
                str(self.root / "admin.pw"),
            ],
            input=textwrap.dedent(ldif).encode(),
            capture_output=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ldapmodify failed: {done.stderr.decode()}")


def _people_ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: gateway\nuserPassword: {SERVICE_PASSWORD}\n",
    ]
    for user, password in PASSWORDS.items():
        entries.append(
            f"dn: uid={user},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {user}\ncn: {user.title()}\n"
            f"sn: {user.title()}\nuserPassword: {password}\n"
        )
    return "\n".join(entries)


def create(root: Path) -> Directory:
    """A directory with people, a service account and (added live, for memberOf) groups, running."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "db").mkdir(exist_ok=True)
    ca, cert, key = make_ca_and_server_cert(root)
    (root / "admin.pw").write_text(ADMIN_PASSWORD)
    (root / "admin.pw").chmod(0o600)
    (root / "slapd.conf").write_text(
        textwrap.dedent(f"""\
        include /etc/ldap/schema/core.schema
        include /etc/ldap/schema/cosine.schema
        include /etc/ldap/schema/inetorgperson.schema
        modulepath /usr/lib/ldap
        moduleload back_mdb
        moduleload memberof
        pidfile {root / "slapd.pid"}
        TLSCACertificateFile {ca}
        TLSCertificateFile {cert}
        TLSCertificateKeyFile {key}
        database mdb
        suffix "{BASE}"
        rootdn "{ADMIN_DN}"
        rootpw {ADMIN_PASSWORD}
        directory {root / "db"}
        overlay memberof
        """)
    )
    (root / "people.ldif").write_text(_people_ldif())
    subprocess.run(
        ["/usr/sbin/slapadd", "-f", str(root / "slapd.conf"), "-l", str(root / "people.ldif")],
        check=True,
        capture_output=True,
    )
    directory = Directory(root, free_port(), free_port(), ca)
    directory.start()
    for group, members in MEMBERS.items():
        lines = "".join(f"member: uid={member},{PEOPLE}\n" for member in members)
        directory.modify(
            f"dn: cn={group},{GROUPS}\nchangetype: add\nobjectClass: groupOfNames\ncn: {group}\n{lines}"
        )
    return directory
