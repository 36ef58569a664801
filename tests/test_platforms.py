import textwrap
import time

import pytest
import yaml

from streams.errors import ConfigError
from streams.normalize import Normalizer
from streams.platforms import load_platform_file, load_platforms, parse_time
from streams.records import Interaction
from streams.settings import Settings
from tests.conftest import DATA


def test_builtin_platforms():
    reg = load_platforms()
    assert set(reg) == {"shop", "video", "music"}
    shop = reg["shop"]
    assert shop.identity.shared == "account_id"
    rec = shop.event_model.model_validate(
        {"event_id": "1", "customer_id": 7, "sku": "s", "action": "cart", "ts": "1700000000",
         "junk": {"dropped": True}})
    assert rec.customer_id == "7" and rec.ts == 1700000000.0
    assert not hasattr(rec, "junk")  # unknown fields are dropped


def test_fourth_platform_from_config_file_alone():
    reg = load_platforms(str(DATA / "podcast.yaml"))
    assert set(reg) == {"shop", "video", "music", "podcast"}
    n = Normalizer(Settings(env="dev"), reg)
    now = time.time()
    out = n.normalize(
        b'{"id": "p1", "listener": "raw-listener-1", "episode": "ep-9", "seconds": 900, '
        b'"at": %d}' % now, topic="x.events.podcast", partition=0, offset=3,
        timestamp_ms=None, platform="podcast")
    assert isinstance(out, Interaction)
    assert (out.platform, out.item, out.kind, out.label) == ("podcast", "ep-9", "listen", 1)
    assert out.weight == pytest.approx(0.5)
    assert "raw-listener-1" not in out.model_dump_json()


def test_catalog_text_template_skips_missing_fields():
    shop = load_platforms()["shop"]
    assert shop.catalog_text({"title": "Telescope", "category": None, "brand": "Orion"}) == \
        "Telescope. Orion"


@pytest.mark.parametrize("path,value,msg", [
    (("event", "item"), "nope", "undeclared fields ['nope']"),
    (("name",), "Bad-Name", "platform names"),
    (("event", "kind"), "__import__('os')", "only calls to"),
    (("identity", "user"), "ghost", "names field 'ghost'"),
])
def test_bad_platform_files_say_what_is_wrong(tmp_path, path, value, msg):
    data = yaml.safe_load((DATA / "podcast.yaml").read_text())
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_platform_file(f)
    assert msg in str(exc.value)
    assert "bad.yaml" in str(exc.value)


def test_missing_platform_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_platforms(str(tmp_path / "nope.yaml"))


def test_enum_without_values(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(textwrap.dedent("""
        name: p
        identity: {user: u}
        event:
          fields: {u: {type: str}, i: {type: str}, k: {type: enum}, t: {type: timestamp}}
          event_id: i
          item: i
          time: t
          kind: k
          rules: [{label: 1}]
        catalog: {id: i, fields: {i: {type: str}}, text: "{i}"}
    """))
    with pytest.raises(ConfigError, match="enum field needs"):
        load_platform_file(f)


@pytest.mark.parametrize("value,want", [
    (1700000000, 1700000000.0),
    (1700000000123, 1700000000.123),
    (1700000000123456, 1700000000.123456),
    ("2023-11-14T22:13:20Z", 1700000000.0),
    ("2023-11-14T22:13:20", 1700000000.0),
    ("1700000000.5", 1700000000.5),
])
def test_parse_time(value, want):
    assert parse_time(value) == pytest.approx(want)


@pytest.mark.parametrize("bad", [True, "yesterday", float("nan"), None, [1]])
def test_parse_time_rejects(bad):
    with pytest.raises(ValueError):
        parse_time(bad)
