from hqdit_utils.provenance import environment, environment_report


def test_environment_names_the_pinned_torch_and_the_profile():
    env = environment()
    assert env["torch"].startswith("2.")
    assert env["HQDIT_PROFILE"] in {"ci", "book", "full"}
    assert list(environment_report().columns) == ["value"]
