"""Driver-side file operations of the prep job through `pyarrow.fs`, so the same code works on a
local disk, HDFS, S3 or GCS (whatever filesystems the installed pyarrow supports): Spark writes
the data, the driver lists, renames, reads Parquet footers and writes the JSON files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class Location:
    fs: pafs.FileSystem
    path: str  # path inside `fs`
    uri: str  # what Spark is given

    @classmethod
    def of(cls, uri: str) -> Location:
        if "://" not in uri:
            path = os.path.abspath(os.path.expanduser(uri))
            return cls(pafs.LocalFileSystem(), path, path)
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(fs, path, uri)

    def child(self, *parts: str) -> Location:
        sep = "/"
        path = sep.join([self.path.rstrip(sep), *parts])
        uri = sep.join([self.uri.rstrip(sep), *parts])
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def is_empty_dir(self) -> bool:
        return self.is_dir() and not self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))

    def entry_names(self) -> list[str]:
        """Names of the files and folders directly in this folder, sorted."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos)

    def list_files(self, suffix: str = "", recursive: bool = True) -> list[str]:
        """Paths (inside fs) of files under this folder ending with `suffix`, sorted; files
        and folders whose name starts with '_' or '.' are skipped (Spark/Hadoop markers)."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            rel = info.path[len(self.path.rstrip("/")) + 1 :]
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            out.append(info.path)
        return sorted(out)

    def uri_of(self, path: str) -> str:
        """Spark URI of a path inside this location's filesystem."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        rel = path[len(self.path.rstrip("/")) + 1 :]
        return self.uri.rstrip("/") + "/" + rel

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def move_to(self, other: Location) -> None:
        self.fs.move(self.path, other.path)

    def write_json(self, obj) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write((json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())

    def read_json(self):
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read().decode())

    def read_parquet_meta(self, path: str) -> pq.FileMetaData:
        with self.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata


def finalize_spark_output(folder: Location, prefix: str = "part") -> list[tuple[str, int]]:
    """Rename Spark's `part-00003-<uuid>-c000.snappy.parquet` files to `part-00000.parquet`, ...
    in Spark's partition order (so two runs give the same names), delete its marker and
    checksum files, and return [(relative name, rows)]."""
    if not folder.is_dir():
        return []
    files = folder.list_files(".parquet", recursive=False)
    out = []
    for i, path in enumerate(files):
        name = f"{prefix}-{i:05d}.parquet"
        target = folder.child(name).path
        folder.fs.move(path, target)
        out.append((name, folder.read_parquet_meta(target).num_rows))
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=False))
    for info in infos:
        base = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.File and (base.startswith(("_", ".")) or base.endswith(".crc")):
            folder.fs.delete_file(info.path)
    return out
