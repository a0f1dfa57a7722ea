// The Apache Kafka Java AdminClient (and producer) for the proxy tests: one JVM runs a
// sequence of operations on one client, one output line each, so a denial that closed the
// connection or broke the client shows in the operations after it.
//
//   java KAdmin.java BOOTSTRAP OP[:ARG] ...
//   delete:T1,T2        per topic "T=OK" or "T=<exception class>"
//   delete-id:T         deletes T by topic ID (DeleteTopics v6): looks the ID up first
//   create:T            createTopics (1 partition, replication 1)
//   partitions:T        createPartitions to 2
//   delete-records:T    deleteRecords before offset 1 of partition 0
//   describe-configs:T  describeConfigs of the topic resource
//   alter-configs:T     incrementalAlterConfigs retention.ms=1000
//   commit:T            alterConsumerGroupOffsets of group kadmin (OffsetCommit)
//   fetch-offsets:T     listConsumerGroupOffsets of group kadmin for T (OffsetFetch)
//   delete-offsets:T    deleteConsumerGroupOffsets of group kadmin (OffsetDelete)
//   produce:T           two records to partition 0
//   state:T             "T partitions=N earliest=O retention.ms=V" (what survived)
//   id:T                T's topic ID, 32 hex digits
//   list                the topic names, sorted
import java.util.*;
import java.util.concurrent.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.*;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.serialization.StringSerializer;

public class KAdmin {
    static String err(Throwable t) {
        while ((t instanceof ExecutionException || t instanceof CompletionException) && t.getCause() != null) t = t.getCause();
        return t.getClass().getSimpleName();
    }

    static String res(KafkaFuture<?> f) {
        try {
            f.get(30, TimeUnit.SECONDS);
            return "OK";
        } catch (Exception e) {
            return err(e);
        }
    }

    static <K> String each(Map<K, ? extends KafkaFuture<?>> m) {
        StringBuilder b = new StringBuilder();
        m.forEach((k, f) -> b.append(' ').append(k).append('=').append(res(f)));
        return b.toString();
    }

    public static void main(String[] a) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", a[0]);
        p.put("client.id", "kadmin");
        p.put("request.timeout.ms", "15000");
        p.put("default.api.timeout.ms", "30000");
        String group = "kadmin";
        try (Admin admin = Admin.create(p)) {
            for (int i = 1; i < a.length; i++) {
                String[] op = a[i].split(":", 2);
                String arg = op.length > 1 ? op[1] : "";
                List<String> topics = Arrays.asList(arg.split(","));
                TopicPartition tp = new TopicPartition(topics.get(0), 0);
                String out;
                try {
                    switch (op[0]) {
                        case "delete" -> out = each(new TreeMap<>(admin.deleteTopics(topics).topicNameValues()));
                        case "delete-id" -> {
                            Uuid id;
                            try {
                                id = admin.describeTopics(topics).allTopicNames().get().get(topics.get(0)).topicId();
                            } catch (Exception e) {
                                throw new RuntimeException("looking the topic ID up: " + err(e), e);
                            }
                            out = " " + topics.get(0) + "=" + res(admin.deleteTopics(TopicCollection.ofTopicIds(List.of(id))).all());
                        }
                        case "create" -> out = each(new TreeMap<>(admin.createTopics(topics.stream().map(t -> new NewTopic(t, 1, (short) 1)).toList()).values()));
                        case "partitions" -> {
                            Map<String, NewPartitions> m = new TreeMap<>();
                            topics.forEach(t -> m.put(t, NewPartitions.increaseTo(2)));
                            out = each(new TreeMap<>(admin.createPartitions(m).values()));
                        }
                        case "delete-records" -> out = " " + tp.topic() + "=" + res(admin.deleteRecords(Map.of(tp, RecordsToDelete.beforeOffset(1))).all());
                        case "describe-configs" -> out = " " + tp.topic() + "=" + res(admin.describeConfigs(List.of(new ConfigResource(ConfigResource.Type.TOPIC, tp.topic()))).all());
                        case "alter-configs" -> {
                            var op1 = new AlterConfigOp(new ConfigEntry("retention.ms", "1000"), AlterConfigOp.OpType.SET);
                            out = " " + tp.topic() + "=" + res(admin.incrementalAlterConfigs(Map.of(new ConfigResource(ConfigResource.Type.TOPIC, tp.topic()), List.of(op1))).all());
                        }
                        case "commit" -> out = " " + tp.topic() + "=" + res(admin.alterConsumerGroupOffsets(group, Map.of(tp, new OffsetAndMetadata(1))).all());
                        case "fetch-offsets" -> {
                            var spec = new ListConsumerGroupOffsetsSpec().topicPartitions(List.of(tp));
                            var f = admin.listConsumerGroupOffsets(Map.of(group, spec)).partitionsToOffsetAndMetadata(group);
                            String r;
                            try {
                                var m = f.get(30, TimeUnit.SECONDS);
                                r = m.containsKey(tp) ? (m.get(tp) == null ? "none" : "offset" + m.get(tp).offset()) : "absent";
                            } catch (Exception e) {
                                r = err(e);
                            }
                            out = " " + tp.topic() + "=" + r;
                        }
                        case "delete-offsets" -> out = " " + tp.topic() + "=" + res(admin.deleteConsumerGroupOffsets(group, Set.of(tp)).all());
                        case "produce" -> {
                            Properties pp = new Properties();
                            pp.putAll(p);
                            pp.put("key.serializer", StringSerializer.class.getName());
                            pp.put("value.serializer", StringSerializer.class.getName());
                            try (var prod = new KafkaProducer<String, String>(pp)) {
                                prod.send(new ProducerRecord<>(tp.topic(), 0, "k", "one")).get(30, TimeUnit.SECONDS);
                                prod.send(new ProducerRecord<>(tp.topic(), 0, "k", "two")).get(30, TimeUnit.SECONDS);
                            }
                            out = " " + tp.topic() + "=OK";
                        }
                        case "state" -> {
                            String t = tp.topic();
                            int n = admin.describeTopics(List.of(t)).allTopicNames().get().get(t).partitions().size();
                            long earliest = admin.listOffsets(Map.of(tp, OffsetSpec.earliest())).partitionResult(tp).get().offset();
                            var res = new ConfigResource(ConfigResource.Type.TOPIC, t);
                            String retention = admin.describeConfigs(List.of(res)).all().get().get(res).get("retention.ms").value();
                            out = " " + t + " partitions=" + n + " earliest=" + earliest + " retention.ms=" + retention;
                        }
                        case "id" -> {
                            Uuid id = admin.describeTopics(topics).allTopicNames().get().get(topics.get(0)).topicId();
                            out = " " + String.format("%016x%016x", id.getMostSignificantBits(), id.getLeastSignificantBits());
                        }
                        case "list" -> out = " " + String.join(",", new TreeSet<>(admin.listTopics().names().get()));
                        default -> out = " unknown op";
                    }
                } catch (Exception e) {
                    out = " " + err(e) + (e.getMessage() != null && e.getMessage().startsWith("looking") ? " " + e.getMessage() : "");
                }
                System.out.println(op[0] + out);
                System.out.flush();
            }
        }
    }
}
