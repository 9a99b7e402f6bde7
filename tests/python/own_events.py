"""Another application's events, written and read by clients nobody here wrote.

Usage:
  own_events.py write MONGODB_URI DATABASE EVENT_NAME COUNT
      An "orders" service written in Python: each order and its outbox row
      (aggregateType Order, eventName EVENT_NAME, eventVersion 1) in one
      MongoDB transaction with pymongo. Prints the event ids, one per line.
  own_events.py read BOOTSTRAP REGISTRY_URL TOPIC COUNT
      Confluent's consumer and AvroDeserializer (the writer schema from the
      registry by the id in each record): prints each record as a JSON line
      {"key", "value", "headers"}.
  own_events.py produce BOOTSTRAP REGISTRY_URL TOPIC COUNT
      Confluent's producer and AvroSerializer (TopicNameStrategy,
      auto-registration): OrderPlaced records keyed by order id, no headers.
      Prints the order ids.
Exits non-zero with a message on the first failure.
"""
import datetime
import json
import sys
import uuid

ORDER_PLACED = json.dumps({
    "type": "record", "name": "OrderPlaced", "namespace": "com.acme.orders",
    "fields": [{"name": "orderId", "type": "string"}, {"name": "amountCents", "type": "long"},
               {"name": "currency", "type": "string"}],
})


def write(uri, database, event_name, count):
    from pymongo import MongoClient
    client = MongoClient(uri)
    db = client[database]
    for i in range(count):
        order_id = f"o-{uuid.uuid4()}"
        event_id = str(uuid.uuid4())
        now = datetime.datetime.now(datetime.timezone.utc)
        with client.start_session() as session:
            with session.start_transaction():
                db.orders.insert_one({"_id": order_id, "amountCents": 1000 + i, "currency": "EUR"}, session=session)
                db.outbox.insert_one({
                    "_id": event_id, "docVersion": 2, "aggregateType": "Order", "aggregateId": order_id,
                    "eventName": event_name, "eventVersion": 1, "occurredOn": now,
                    "payload": {"orderId": order_id, "amountCents": 1000 + i, "currency": "EUR"},
                }, session=session)
        print(event_id, flush=True)


def read(bootstrap, registry, topic, count):
    from confluent_kafka import Consumer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"own-events-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen = 0
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=60)
    while seen < count:
        if datetime.datetime.now() > deadline:
            sys.exit(f"read {seen} of {count} records of {topic} in 60 s")
        m = consumer.poll(1.0)
        if m is None:
            continue
        if m.error():
            sys.exit(f"consume error: {m.error()}")
        value = deserialize(m.value(), SerializationContext(topic, MessageField.VALUE))
        headers = {k: v.decode() for k, v in (m.headers() or [])}
        print(json.dumps({"key": m.key().decode(), "value": value, "headers": headers}, default=str), flush=True)
        seen += 1
    consumer.close()


def produce(bootstrap, registry, topic, count):
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    serialize = AvroSerializer(SchemaRegistryClient({"url": registry}), ORDER_PLACED)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(count):
        order_id = f"o-{i}"
        value = serialize({"orderId": order_id, "amountCents": 500 + i, "currency": "EUR"},
                          SerializationContext(topic, MessageField.VALUE))
        producer.produce(topic, key=order_id.encode(), value=value)
        print(order_id, flush=True)
    if producer.flush(30) != 0:
        sys.exit("records left unsent after 30 s")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "write":
        write(args[0], args[1], args[2], int(args[3]))
    elif command == "read":
        read(args[0], args[1], args[2], int(args[3]))
    elif command == "produce":
        produce(args[0], args[1], args[2], int(args[3]))
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
