"""Kept releases that no tenant can change, and that share identical files (decision 033).

`seal` runs as root once a release is installed and built, before it migrates or starts:
    python3 -I -S -B releases.py seal --release R --store S --user U [--writable PATH=TARGET]
It never takes over the tenant's files: it builds a new tree beside the release, in a folder only
root can enter, from what the tenant's tree holds, then puts it in the release's place.

- Every folder is made anew, root's with the environment's group, 0750; every file is the one
  copy of its content in the service's store (`S`, root's, 0750), made by root from the bytes
  read and linked into the tree: 0640, or 0750 if it was executable. Links are made anew with the
  same target, root's; they are never followed here. FIFOs, sockets and devices are left out. The
  release's top-level `.env` (and a `.env.deploy-N` staged for its next start) is copied as the
  user's, 0600 (the launcher reads it as the user, and each start writes it anew). `PATH=TARGET` makes `PATH` a link to `TARGET` in the user's shared
  folder.
- The tenant's own tree is then removed. Nothing the tenant still holds (a process of the
  environment, a descriptor opened for writing, a name it adds while the seal runs) reaches the
  new tree or the store: the tenant can read and run its release and change none of it, so a
  rollback runs exactly what was deployed.
- Only the environment's own files and folders are read: anything else in the tree (another's
  file, a root file the tenant made a hard link to) is refused, and so are trees deeper than
  MAX_DEPTH or larger than MAX_ENTRIES. Each name is opened with O_NOFOLLOW (and O_NONBLOCK) from
  its folder's descriptor and checked by that descriptor before anything is read. Bytes are
  hashed and copied, never parsed or run.

A store is one service's own: nothing is shared between services, let alone environments, so no
tenant can place content in another's release. `prune` removes store files no release links to
any more, and what a seal that was cut short left beside the releases. Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import sys

CHUNK = 1 << 20
MAX_DEPTH = 100
MAX_ENTRIES = 1_000_000
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LEFTOVERS = (".sealing-", ".unsealed-")
ENV_FILE = re.compile(r"\.env(\.deploy-[0-9]+)?")


class Refused(Exception):
    pass


def _hash(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _root_folder(fd: int, what: str) -> None:
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise Refused(f"{what} is not root's alone")


class Sealer:
    def __init__(self, release: str, store: str, user: str, writable: list[tuple[str, str]] = ()) -> None:
        entry = pwd.getpwnam(user)
        self.release, self.store, self.uid, self.gid = release.rstrip("/"), store, entry.pw_uid, entry.pw_gid
        self.writable = list(writable)
        self.entries = self.files = self.shared = self.saved = 0

    def seal(self) -> dict:
        parent, name = os.path.split(self.release)
        parent_fd = os.open(parent, DIR_FLAGS)
        try:
            _root_folder(parent_fd, parent)
            src_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            try:
                info = os.fstat(src_fd)
                if info.st_uid == 0 and info.st_gid == self.gid and not info.st_mode & 0o027:
                    return {"files": 0, "shared": 0, "saved_bytes": 0, "sealed_already": True}
                if info.st_uid != self.uid:
                    raise Refused(f"the release is not the environment's (owner {info.st_uid})")
                store_fd = self._store()
                try:
                    built = f".sealing-{name}-{secrets.token_hex(4)}"
                    os.mkdir(built, 0o700, dir_fd=parent_fd)
                    try:
                        dst_fd = os.open(built, DIR_FLAGS, dir_fd=parent_fd)
                        try:
                            self._copy_tree(src_fd, dst_fd, store_fd, 0)
                            for path, target in self.writable:
                                self._link(dst_fd, path, target)
                            os.fchown(dst_fd, 0, self.gid)
                            os.fchmod(dst_fd, 0o750)
                        finally:
                            os.close(dst_fd)
                    except BaseException:
                        shutil.rmtree(built, dir_fd=parent_fd, ignore_errors=True)
                        raise
                finally:
                    os.close(store_fd)
            finally:
                os.close(src_fd)
            old = f".unsealed-{name}-{secrets.token_hex(4)}"
            os.rename(name, old, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            os.rename(built, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            shutil.rmtree(old, dir_fd=parent_fd, ignore_errors=True)  # what stays (a racing process) goes at prune
        finally:
            os.close(parent_fd)
        return {"files": self.files, "shared": self.shared, "saved_bytes": self.saved}

    def _store(self) -> int:
        parent, name = os.path.split(self.store)
        parent_fd = os.open(parent, DIR_FLAGS)
        try:
            _root_folder(parent_fd, parent)
            try:
                os.mkdir(name, 0o750, dir_fd=parent_fd)
            except FileExistsError:
                pass
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        if os.fstat(fd).st_uid != 0:
            os.close(fd)
            raise Refused(f"{self.store} is not root's")
        os.fchown(fd, 0, self.gid)
        os.fchmod(fd, 0o750)
        return fd

    def _copy_tree(self, src_fd: int, dst_fd: int, store_fd: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Refused(f"folders nested deeper than {MAX_DEPTH}")
        for name in sorted(os.listdir(src_fd)):
            self.entries += 1
            if self.entries > MAX_ENTRIES:
                raise Refused(f"more than {MAX_ENTRIES} entries")
            info = os.lstat(name, dir_fd=src_fd)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                os.chown(name, 0, self.gid, dir_fd=dst_fd, follow_symlinks=False)
            elif stat.S_ISDIR(info.st_mode):
                self._copy_folder(src_fd, dst_fd, store_fd, name, depth)
            elif stat.S_ISREG(info.st_mode):
                self._copy_file(src_fd, dst_fd, store_fd, name, top=depth == 0)
            # FIFOs, sockets, devices: nothing a release needs, left out

    def _copy_folder(self, src_fd: int, dst_fd: int, store_fd: int, name: str, depth: int) -> None:
        try:
            sub = os.open(name, DIR_FLAGS, dir_fd=src_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                return  # swapped or gone while the seal ran: not part of what was built
            raise
        try:
            if os.fstat(sub).st_uid != self.uid:
                raise Refused(f"folder {name!r} is not the environment's")
            os.mkdir(name, 0o750, dir_fd=dst_fd)
            made = os.open(name, DIR_FLAGS, dir_fd=dst_fd)
            try:
                os.fchown(made, 0, self.gid)
                os.fchmod(made, 0o750)
                self._copy_tree(sub, made, store_fd, depth + 1)
            finally:
                os.close(made)
        finally:
            os.close(sub)

    def _copy_file(self, src_fd: int, dst_fd: int, store_fd: int, name: str, top: bool) -> None:
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=src_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                return
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return
            if info.st_uid != self.uid:
                # Another's file, or root's that the tenant made a link to: never read, never copied.
                raise Refused(f"{name!r} is not the environment's own file (owner {info.st_uid})")
            self.files += 1
            if top and ENV_FILE.fullmatch(name):  # the .env, or one staged for the next start
                self._private_copy(fd, dst_fd, name, 0o600, (self.uid, self.gid))
                return
            mode = 0o750 if info.st_mode & 0o111 else 0o640
            if info.st_size == 0:
                self._private_copy(fd, dst_fd, name, mode, (0, self.gid))
                return
            key = f"{_hash(fd)}-{mode:o}"
            if not self._stored(store_fd, key):
                key = self._store_copy(fd, store_fd, mode)
            else:
                self.shared += 1
                self.saved += info.st_size
            try:
                os.link(key, name, src_dir_fd=store_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                self._private_copy(fd, dst_fd, name, mode, (0, self.gid))  # that content has too many names
        finally:
            os.close(fd)

    def _stored(self, store_fd: int, key: str) -> bool:
        try:
            kept = os.stat(key, dir_fd=store_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(kept.st_mode) and kept.st_uid == 0

    def _store_copy(self, fd: int, store_fd: int, mode: int) -> str:
        """The file's bytes as a new store entry, named by the hash of what was read."""
        tmp = f".new-{secrets.token_hex(8)}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=store_fd)
        digest = hashlib.sha256()
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
                os.write(out, chunk)
            os.fchown(out, 0, self.gid)
            os.fchmod(out, mode)
        finally:
            os.close(out)
        key = f"{digest.hexdigest()}-{mode:o}"
        try:
            os.link(tmp, key, src_dir_fd=store_fd, dst_dir_fd=store_fd, follow_symlinks=False)
        except FileExistsError:
            pass  # the same content stored meanwhile: that copy serves
        os.unlink(tmp, dir_fd=store_fd)
        return key

    def _private_copy(self, fd: int, dst_fd: int, name: str, mode: int, owner: tuple[int, int]) -> None:
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, CHUNK):
                os.write(out, chunk)
            os.fchown(out, *owner)
            os.fchmod(out, mode)
        finally:
            os.close(out)

    def _link(self, top_fd: int, path: str, target: str) -> None:
        """`path` of the new tree (root's, and closed to the tenant while it is built) becomes a
        link to `target` in the user's shared folder; what the release held there goes."""
        parts = path.strip("/").split("/")
        fd = os.dup(top_fd)
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                    os.chown(part, 0, self.gid, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
                _root_folder(fd, part)
            name = parts[-1]
            try:
                info = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                info = None
            if info is not None and stat.S_ISDIR(info.st_mode):
                shutil.rmtree(name, dir_fd=fd)
            elif info is not None:
                os.unlink(name, dir_fd=fd)
            os.symlink(target, name, dir_fd=fd)
            os.chown(name, 0, self.gid, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)


def prune(store: str) -> dict:
    """Remove the store's files that no release links to any more, and what a seal that was cut
    short left beside the releases (`.sealing-*`, `.unsealed-*`)."""
    removed = freed = 0
    try:
        fd = os.open(store, DIR_FLAGS)
    except FileNotFoundError:
        return {"removed": 0, "freed_bytes": 0}
    try:
        _root_folder(fd, store)
        for name in os.listdir(fd):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.unlink(name, dir_fd=fd)
                removed, freed = removed + 1, freed + info.st_size
    finally:
        os.close(fd)
    releases = os.path.join(os.path.dirname(store), "releases")
    try:
        rfd = os.open(releases, DIR_FLAGS)
    except FileNotFoundError:
        return {"removed": removed, "freed_bytes": freed}
    try:
        _root_folder(rfd, releases)
        for name in os.listdir(rfd):
            if name.startswith(LEFTOVERS):
                shutil.rmtree(name, dir_fd=rfd, ignore_errors=True)
    finally:
        os.close(rfd)
    return {"removed": removed, "freed_bytes": freed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="releases")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seal")
    s.add_argument("--release", required=True)
    s.add_argument("--store", required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--writable", action="append", default=[], help="PATH=TARGET")
    p = sub.add_parser("prune")
    p.add_argument("--store", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "seal":
            writable = [tuple(w.split("=", 1)) for w in args.writable]
            print(json.dumps(Sealer(args.release, args.store, args.user, writable).seal()))
        else:
            print(json.dumps(prune(args.store)))
    except (Refused, OSError, KeyError) as exc:
        print(f"release {getattr(args, 'release', args.store)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def seal_exec(spec, services_root):
    """The exec that runs a ReleaseSealSpec; StartError unless its folders are a service's own
    under the services root and its user one of the deployer's (the controller names them, still
    checked)."""
    from protos import deployer_pb2 as pb
    from agent.executor import StartError
    root = os.path.abspath(str(services_root))
    service = re.escape(root) + r"/auto-[a-z0-9][a-z0-9-]*"
    if not re.fullmatch(service + "/store", spec.store) or os.path.normpath(spec.store) != spec.store:
        raise StartError(f"not a service's store: {spec.store[:120]!r}")
    python = sys.executable or "/usr/bin/python3"
    if spec.prune:
        return pb.ExecSpec(argv=[python, "-I", "-S", "-B", os.path.abspath(__file__), "prune", f"--store={spec.store}"],
                           cwd="/")
    if (not re.fullmatch(service + r"/releases/\d+", spec.release) or os.path.normpath(spec.release) != spec.release
            or os.path.dirname(os.path.dirname(spec.release)) != os.path.dirname(spec.store)):
        raise StartError(f"not a release of that service: {spec.release[:120]!r}")
    if not re.fullmatch(r"auto-[a-z0-9][a-z0-9-]{0,30}", spec.user):
        raise StartError(f"not an environment's user: {spec.user[:40]!r}")
    shared = os.path.dirname(spec.store) + "/shared/"
    part = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}"
    writable = []
    for w in spec.writable:
        if (not re.fullmatch(f"{part}(/{part})*", w.path) or not w.target.startswith(shared)
                or not re.fullmatch(f"{part}(/{part})*", w.target[len(shared):]) or "=" in w.path):
            raise StartError(f"not a writable path of that service: {w.path[:80]!r} -> {w.target[:120]!r}")
        writable.append(f"--writable={w.path}={w.target}")
    return pb.ExecSpec(argv=[python, "-I", "-S", "-B", os.path.abspath(__file__), "seal", f"--release={spec.release}",
                             f"--store={spec.store}", f"--user={spec.user}", *writable], cwd="/")
