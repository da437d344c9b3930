"""The Hub at the API boundary: `HfApi.create_repo` and `HfApi.create_commit` record what they were asked, offline."""

from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, RepoUrl


class FakeHub:
    """Patches `HfApi` for one test. `repos` and `commits` hold each call's arguments; a commit's `files` are its
    `{path in repo: bytes}`, read when the commit was made."""

    def __init__(self, monkeypatch, user: str = "user"):
        self.user, self.repos, self.commits = user, [], []
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.repos.append({"repo_id": repo_id, "token": api.token, "private": private, "exist_ok": exist_ok})
            return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else f'{hub.user}/{repo_id}'}")

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            hub.commits.append({"repo_id": repo_id, "token": api.token, "message": commit_message, "files": files})
            oid = f"{len(hub.commits):040x}"
            return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message, "", oid)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    @property
    def commit(self) -> dict:
        """The one commit made."""
        assert len(self.repos) == 1 and len(self.commits) == 1, (self.repos, [c["files"].keys() for c in self.commits])
        return self.commits[0]
