"""Kept releases that no tenant can change, and that share identical files (decision 033).

`seal` runs as root once a release is installed and built, before it migrates or starts:
    python3 -I -S -B releases.py seal --release R --store S --user U
Every folder and file of the release becomes root's, with the environment's group, readable and
never writable by it (folders 0750, files 0640, or 0750 if they were executable): the tenant's
next install, or a compromised process, can read and run a kept release but never change it,
so a rollback runs what was deployed. The release's top-level `.env` files stay the user's
(the launcher reads them as that user; they are rewritten at each start anyway).

Then each file that is not empty is swapped for a hard link to the one copy of its
content in the service's store (`S`, root's, 0750, beside `releases/`): one content, one inode,
for all kept releases of the service. The store is one service's own: nothing is shared between
services, let alone environments, so no tenant can place content in another's release.

Walked with directory descriptors (os.fwalk), never following a link; each file is opened
(O_NOFOLLOW) and checked by its descriptor before it is changed, so a name swapped meanwhile is
never taken for another. A file with other hard links (one the tenant made to a file elsewhere)
is copied to an inode of its own first if it is the environment's, and refused otherwise: sealing
never changes the owner or mode of anything outside the release. Bytes are read to be hashed and
copied, never parsed or run.

`prune` removes store files no release links to any more. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import stat
import sys

SHARE_MIN = 1  # every file with content: a small file still takes a block of its own
CHUNK = 1 << 20


class Refused(Exception):
    pass


def _copy_apart(dir_fd: int, name: str, fd: int) -> int:
    """Replace `name` (open as `fd`) by a copy of its bytes in an inode of its own; the new fd."""
    tmp = f".seal-{os.getpid()}-{name}"[:200]
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, CHUNK):
            os.write(out, chunk)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.close(out)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    return out


def _hash(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


class Sealer:
    def __init__(self, release: str, store: str, user: str, writable: list[tuple[str, str]] = ()) -> None:
        entry = pwd.getpwnam(user)
        self.release, self.store, self.uid, self.gid = release, store, entry.pw_uid, entry.pw_gid
        self.writable = list(writable)
        self.files = self.shared = self.saved = 0

    def seal(self) -> dict:
        os.makedirs(self.store, mode=0o750, exist_ok=True)
        store_fd = os.open(self.store, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(store_fd, 0, self.gid)
            os.fchmod(store_fd, 0o750)
            top = True
            for _path, dirs, files, dir_fd in os.fwalk(self.release, follow_symlinks=False):
                self._folder(dir_fd)
                for name in files:
                    if top and name.startswith(".env"):
                        continue  # the user's, read by the launcher as the user
                    self._entry(dir_fd, name, store_fd)
                for name in dirs:  # links to folders are listed among the folders
                    if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                        os.chown(name, 0, self.gid, dir_fd=dir_fd, follow_symlinks=False)
                top = False
        finally:
            os.close(store_fd)
        for path, target in self.writable:
            self._link(path, target)
        return {"files": self.files, "shared": self.shared, "saved_bytes": self.saved}

    def _link(self, path: str, target: str) -> None:
        """`path` of the sealed release becomes a link (root's) to `target` in the user's shared
        folder: folders on the way are the release's own, opened without following a link, and
        whatever the release held at `path` goes. The link is never followed here."""
        parts = path.strip("/").split("/")
        fd = os.open(self.release, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                    os.chown(part, 0, self.gid, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = inner
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

    def _folder(self, dir_fd: int) -> None:
        info = os.fstat(dir_fd)
        if info.st_uid not in (self.uid, 0):
            raise Refused(f"a folder of the release is not the environment's (owner {info.st_uid})")
        os.fchown(dir_fd, 0, self.gid)
        os.fchmod(dir_fd, 0o750)

    def _entry(self, dir_fd: int, name: str, store_fd: int) -> None:
        info = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(info.st_mode):
            os.chown(name, 0, self.gid, dir_fd=dir_fd, follow_symlinks=False)
            return
        if not stat.S_ISREG(info.st_mode):
            os.unlink(name, dir_fd=dir_fd)  # a fifo or socket left by a build: nothing a release needs
            return
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Refused(f"{name!r} changed while the release was sealed")
            if info.st_uid == 0 and info.st_gid == self.gid and not info.st_mode & 0o022:
                self.files += 1  # sealed already (a release checked out again, or the store's): left as it is
                return
            if info.st_uid != self.uid and not (info.st_uid == 0 and info.st_nlink == 1):
                # Another's file, or root's with other names: perhaps a link to a file elsewhere,
                # whose owner and mode must not change, nor its bytes be copied where the tenant reads.
                raise Refused(f"{name!r} is not the environment's own file (owner {info.st_uid}, "
                              f"{info.st_nlink} links): not sealed")
            if info.st_nlink > 1:
                fd = _copy_apart(dir_fd, name, fd)
                info = os.fstat(fd)
            mode = 0o750 if info.st_mode & 0o111 else 0o640
            os.fchown(fd, 0, self.gid)
            os.fchmod(fd, mode)
            self.files += 1
            if info.st_size >= SHARE_MIN:
                self._share(dir_fd, name, fd, info.st_size, mode, store_fd)
        finally:
            os.close(fd)

    def _share(self, dir_fd: int, name: str, fd: int, size: int, mode: int, store_fd: int) -> None:
        key = f"{_hash(fd)}-{mode:o}"
        try:
            kept = os.stat(key, dir_fd=store_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.link(name, key, src_dir_fd=dir_fd, dst_dir_fd=store_fd, follow_symlinks=False)
            return
        if not stat.S_ISREG(kept.st_mode) or kept.st_uid != 0 or kept.st_size != size:
            return  # not one of ours as it should be: this release keeps its own copy
        tmp = f".share-{os.getpid()}"
        os.link(key, tmp, src_dir_fd=store_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.shared += 1
        self.saved += size


def prune(store: str) -> dict:
    """Remove the store's files that no release links to any more."""
    removed = freed = 0
    try:
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {"removed": 0, "freed_bytes": 0}
    try:
        for name in os.listdir(fd):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.unlink(name, dir_fd=fd)
                removed, freed = removed + 1, freed + info.st_size
    finally:
        os.close(fd)
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
    import re
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
