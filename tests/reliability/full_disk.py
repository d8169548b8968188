"""A local filesystem that runs out of space once a run has one complete checkpoint: every later checkpoint's
weights fail to write with ENOSPC, as on a disk that filled up mid-run. Handed to Ray Train as its storage
filesystem, so the failure happens where Ray uploads checkpoints."""

import errno
import posixpath

import pyarrow.fs as pafs

CHECKPOINT_MANIFEST = "raylm_checkpoint.json"


class FullDiskHandler(pafs.FileSystemHandler):
    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, FullDiskHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def _refuse_when_full(self, path: str) -> None:
        if not path.endswith("model.safetensors"):
            return
        checkpoint = posixpath.dirname(path)
        siblings = self.fs.get_file_info(pafs.FileSelector(posixpath.dirname(checkpoint)))
        for info in siblings:
            done = self.fs.get_file_info(posixpath.join(info.path, CHECKPOINT_MANIFEST))
            if info.path != checkpoint and done.type == pafs.FileType.File:
                raise OSError(errno.ENOSPC, "No space left on device", path)

    def get_type_name(self) -> str:
        return "fulldisk"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError(errno.EPERM, "refusing to empty the root directory")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._refuse_when_full(dest)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._refuse_when_full(path)
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._refuse_when_full(path)
        return self.fs.open_append_stream(path, metadata=metadata)
