"""Storage on a local or shared file system."""

from distcp.filesystem.reader import FileSystemReader, LoadReport
from distcp.filesystem.writer import FileSystemWriter

__all__ = ["FileSystemReader", "FileSystemWriter", "LoadReport"]
