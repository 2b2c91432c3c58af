"""Debian's Orthanc as a test PACS on loopback: the demo's :class:`qsmnode.demo.pacs.Orthanc`
(start, stop, restart, and queries of its REST API)."""

from qsmnode.demo.pacs import Orthanc

__all__ = ["Orthanc"]
