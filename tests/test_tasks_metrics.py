import pytest
import torch
import torch.nn.functional as F

from mtlvision.errors import MTLVisionError
from mtlvision.evaluation import TaskMeter, delta_m
from mtlvision.tasks import Task


def test_loss_masks_missing_labels():
    t = Task("a", ["x", "y", "z"])
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, -1, 2, -1, 1])
    keep = labels >= 0
    torch.testing.assert_close(t.loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    none = t.loss(logits, torch.full((5,), -1))
    assert none.item() == 0.0
    none.backward()  # the graph is kept for an all-missing batch
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_smoothing_and_task_validation():
    t = Task("a", ["x", "y", "z"], label_smoothing=0.1)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(t.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    with pytest.raises(MTLVisionError, match="at least 2 classes"):
        Task("a", ["only"])
    with pytest.raises(MTLVisionError, match="contain no '.'"):
        Task("a.b", ["x", "y"])
    with pytest.raises(MTLVisionError, match="a binary task has 2 classes, got 3"):
        Task("a", ["x", "y", "z"], kind="binary")
    with pytest.raises(MTLVisionError, match="kind must be multiclass or binary"):
        Task("a", ["x", "y"], kind="regression")
    assert Task("a", ["x", "y"]).kind == "binary"


def test_binary_task_kind_and_metrics():
    assert Task("g", ["m", "f"]).kind == "binary"
    assert Task("g", ["m", "f"]).metric_names() == ["accuracy", "balanced_accuracy"]
    assert "top5" in Task("c", [str(i) for i in range(10)]).metric_names()


def test_meter_accuracy_balanced_accuracy_top5():
    m = TaskMeter(Task("g", ["m", "f"]), torch.device("cpu"))
    # 8 of class 0 (all right), 2 of class 1 (one right), 1 missing
    labels = torch.tensor([0] * 8 + [1, 1, -1])
    logits = torch.zeros(11, 2)
    logits[:8, 0] = 1
    logits[8, 1] = 1
    logits[9, 0] = 1
    m.update(logits, labels)
    r = m.compute()
    assert r["count"] == 10
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)

    m10 = TaskMeter(Task("c", [str(i) for i in range(10)]), torch.device("cpu"))
    logits = torch.arange(10.0).repeat(3, 1)  # ranking 9 > 8 > ... > 0
    m10.update(logits, torch.tensor([9, 5, 2]))
    r = m10.compute()
    assert r["accuracy"] == pytest.approx(1 / 3) and r["top5"] == pytest.approx(2 / 3)


def test_delta_m_formula():
    assert delta_m({"a": 0.9, "b": 0.5}, {"a": 0.8, "b": 0.5}) == pytest.approx(100 * (0.1 / 0.8) / 2)
    assert delta_m({"a": 0.7}, {"a": 0.8}) < 0
    with pytest.raises(MTLVisionError, match="no single-task baseline"):
        delta_m({"a": 0.7, "b": 0.1}, {"a": 0.8})
