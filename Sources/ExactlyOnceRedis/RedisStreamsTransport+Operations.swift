import ExactlyOnce

extension RedisStreamsTransport {
    /// The end offset (the offset the next published record gets) of every partition of
    /// `topic`, for operations, lag reports and publishers that resume. Reads Redis only.
    /// - Throws: `ExactlyOnceError/Code/transportFailure` for an unknown topic,
    ///   `ExactlyOnceError/Code/storeUnavailable` when Redis is unreachable.
    public func endOffsets(topic: String) async throws -> [PartitionID: Offset] {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            let replies = try await verifiedPipeline((0..<count).map { [Array("GET".utf8), topicKey(topic, "\($0):seq")] })
            var out: [PartitionID: Offset] = [:]
            for (p, reply) in replies.enumerated() {
                let end = reply == .null ? 0 : try ReplyDecoding.int64(reply, "end offset")
                guard end >= 0 else { throw ReplyDecoding.unexpected("end offset", reply) }
                out[PartitionID(p)] = Offset(end)
            }
            return out
        }
    }
}
