"""Drive the project's schema registry with Confluent's own Python client.

Usage: confluent_client_check.py REGISTRY_URL PREFIX [TOPIC HEX]

Exercises SchemaRegistryClient and AvroSerializer/AvroDeserializer
unchanged against the registry; with TOPIC and HEX, also decodes a record
that the Rust side encoded (Confluent wire format) and prints it as JSON.
Exits non-zero with a message on the first mismatch.
"""
import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

V1 = json.dumps({
    "type": "record", "name": "Thing", "namespace": "smoke",
    "fields": [{"name": "id", "type": "string"}, {"name": "count", "type": "int"}],
})
V2 = json.dumps({
    "type": "record", "name": "Thing", "namespace": "smoke",
    "fields": [{"name": "id", "type": "string"}, {"name": "count", "type": "int"},
               {"name": "note", "type": ["null", "string"], "default": None}],
})
BROKEN = json.dumps({
    "type": "record", "name": "Thing", "namespace": "smoke",
    "fields": [{"name": "id", "type": "long"}],
})


def check(cond, what):
    if not cond:
        sys.exit(f"confluent client check failed: {what}")


def expect_error(fn, code, what):
    try:
        fn()
    except SchemaRegistryError as e:
        check(e.error_code == code, f"{what}: error_code {e.error_code}, want {code} ({e.error_message})")
        return
    sys.exit(f"confluent client check failed: {what}: no error, want {code}")


def main():
    url, prefix = sys.argv[1], sys.argv[2]
    client = SchemaRegistryClient({"url": url})
    topic = f"{prefix}-things"
    subject = f"{topic}-value"

    # Serializer with auto-registration, then the deserializer, unchanged.
    ser = AvroSerializer(client, V1)
    ctx = SerializationContext(topic, MessageField.VALUE)
    record = {"id": "a-1", "count": 7}
    data = ser(record, ctx)
    check(data[0] == 0, "magic byte 0")
    sid = int.from_bytes(data[1:5], "big")
    latest = client.get_latest_version(subject)
    check(latest.schema_id == sid and latest.version == 1, f"latest version {latest}")
    de = AvroDeserializer(SchemaRegistryClient({"url": url}))
    check(de(data, ctx) == record, "round trip through AvroSerializer/AvroDeserializer")

    # Client API: lookup, get by id, versions, compatibility, config.
    check(client.get_schema(sid).schema_str is not None, "get_schema by id")
    found = client.lookup_schema(subject, Schema(V1, "AVRO"))
    check(found.schema_id == sid and found.version == 1, f"lookup_schema {found}")
    check(client.test_compatibility(subject, Schema(V2, "AVRO")), "v2 (new optional field) is compatible")
    check(not client.test_compatibility(subject, Schema(BROKEN, "AVRO")), "type change is incompatible")
    check(client.test_compatibility_all_versions(subject, Schema(V2, "AVRO")), "v2 against all versions")
    v2_id = client.register_schema(subject, Schema(V2, "AVRO"))
    check(v2_id != sid and client.get_versions(subject) == [1, 2], "v2 registered as version 2")
    expect_error(lambda: client.register_schema(subject, Schema(BROKEN, "AVRO")), 409, "incompatible register")
    expect_error(lambda: client.get_version(f"{prefix}-missing", 1), 40401, "unknown subject")
    expect_error(lambda: client.get_version(subject, 9), 40402, "unknown version")
    expect_error(lambda: client.get_schema(999999), 40403, "unknown id")
    expect_error(lambda: client.register_schema(subject, Schema("{nope", "AVRO")), 42201, "invalid schema")
    check(client.set_compatibility(subject, "FULL") == {"compatibility": "FULL"}, "set subject compatibility")
    check(client.get_compatibility(subject) == "FULL", "get subject compatibility")
    check(client.get_compatibility() == "BACKWARD", "global default BACKWARD")
    check(subject in client.get_subjects(), "subject listed")
    check(client.delete_subject(subject) == [1, 2], "soft delete returns versions")
    check(subject not in client.get_subjects(), "soft-deleted subject hidden")
    check(client.delete_subject(subject, permanent=True) == [1, 2], "permanent delete")

    out = {"ok": True}
    if len(sys.argv) == 5:
        rust_topic, hexdata = sys.argv[3], sys.argv[4]
        value = AvroDeserializer(SchemaRegistryClient({"url": url}))(
            bytes.fromhex(hexdata), SerializationContext(rust_topic, MessageField.VALUE))
        out["decoded"] = value
    print(json.dumps(out))


if __name__ == "__main__":
    main()
