#ifndef EXACTLY_ONCE_CRDKAFKA_SHIM_H
#define EXACTLY_ONCE_CRDKAFKA_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <librdkafka/rdkafka.h>
/* The mock cluster: test support (in-process clusters for tests, the demo and benchmarks). */
#include <librdkafka/rdkafka_mock.h>

/* rd_kafka_producev is variadic, which Swift cannot call: one fixed-arity wrapper. The payload
 * and key are copied; on success the headers belong to librdkafka, on failure to the caller. */
static inline rd_kafka_resp_err_t eo_kafka_produce(rd_kafka_t *rk, rd_kafka_topic_t *rkt, int32_t partition,
                                                   const void *payload, size_t payload_len,
                                                   const void *key, size_t key_len,
                                                   rd_kafka_headers_t *headers, void *opaque) {
    if (headers) {
        return rd_kafka_producev(rk, RD_KAFKA_V_RKT(rkt), RD_KAFKA_V_PARTITION(partition),
                                 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_VALUE((void *)payload, payload_len),
                                 RD_KAFKA_V_KEY(key, key_len), RD_KAFKA_V_HEADERS(headers),
                                 RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
    }
    return rd_kafka_producev(rk, RD_KAFKA_V_RKT(rkt), RD_KAFKA_V_PARTITION(partition),
                             RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                             RD_KAFKA_V_VALUE((void *)payload, payload_len),
                             RD_KAFKA_V_KEY(key, key_len), RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
}

/* The group generation of a consumer, read from its group metadata (serialization format v2:
 * "CGMDv2:" then the int32 generation id in host order). Returns 0 and sets *generation on
 * success, -1 when the metadata is missing or in another format. */
static inline int eo_kafka_generation(rd_kafka_t *rk, int32_t *generation) {
    rd_kafka_consumer_group_metadata_t *cgmd = rd_kafka_consumer_group_metadata(rk);
    if (!cgmd) return -1;
    void *buf = NULL;
    size_t size = 0;
    rd_kafka_error_t *error = rd_kafka_consumer_group_metadata_write(cgmd, &buf, &size);
    rd_kafka_consumer_group_metadata_destroy(cgmd);
    if (error) {
        rd_kafka_error_destroy(error);
        return -1;
    }
    int rc = -1;
    if (buf && size >= 11 && memcmp(buf, "CGMDv2:", 7) == 0) {
        memcpy(generation, (const char *)buf + 7, sizeof(int32_t));
        rc = 0;
    }
    rd_kafka_mem_free(rk, buf);
    return rc;
}

#endif
