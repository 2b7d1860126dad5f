"""NetworkFunction manifests: the schema, the loader and repository discovery."""

from nfctl.manifest.loader import LoadedManifest, load_manifest
from nfctl.manifest.model import Hook, MapSpec, NetworkFunction
from nfctl.manifest.repo import RepoScan, scan_repo

__all__ = [
    "Hook",
    "LoadedManifest",
    "MapSpec",
    "NetworkFunction",
    "RepoScan",
    "load_manifest",
    "scan_repo",
]
