"""Encoding and evaluation on Ray (the optional extra, installed by make test): a local Ray with 2 CPUs and 2 model
replicas gives the vectors and the per-query metrics one process gives."""
import numpy as np
import pandas as pd
import pytest

from lib import encoders, evaluate, ray_jobs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one local Ray, on one worker


@pytest.fixture(scope="module")
def local_ray():
    import ray  # the extra: pip install -e .[ray]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    yield ray
    ray.shutdown()


def test_two_replicas_on_ray_encode_and_score_as_one_process_does(local_ray, student_path, srd_slice, tmp_path):
    items, queries = srd_slice[0], [q for q in srd_slice[1] if q["category"].endswith("attribute")]
    item_vectors = ray_jobs.encode([i["text"] for i in items], "torch-fp32", student_path, tmp_path, replicas=2,
                                   batch_size=16, max_seq_length=128)
    here = encoders.TorchEncoder(student_path, 128)
    np.testing.assert_allclose(item_vectors, here.encode([i["text"] for i in items]), atol=1e-5)
    query_vectors = here.encode([q["text"] for q in queries])
    on_ray = ray_jobs.evaluate("base", queries, query_vectors, items, item_vectors, replicas=2, batch_size=5)
    alone = evaluate.evaluate_scores("base", evaluate.dense_scores(query_vectors, item_vectors), queries, items)
    assert len(queries) > 5  # more than one batch
    pd.testing.assert_frame_equal(on_ray[alone.columns], alone, check_dtype=False)


def test_queries_encoded_on_ray_get_the_models_query_prompt(local_ray, cls_student_path, tmp_path):
    texts = ["a fire spell", "a creature that turns people to stone", "a healing prayer"]
    on_ray = ray_jobs.encode(texts, "torch-fp32", cls_student_path, tmp_path, replicas=1, max_seq_length=128, role="query")
    here = encoders.TorchEncoder(cls_student_path, 128)
    np.testing.assert_allclose(on_ray, here.encode(texts, role="query"), atol=1e-5)
    assert not np.allclose(on_ray, here.encode(texts), atol=1e-3)  # the prompt changes the vectors
