from tests.owndata.conftest import data_dir  # noqa: F401 - the own-data tests' store directory
