package io.toolchaingrpc.client;

/**
 * One invalid request field, from {@code google.rpc.BadRequest.field_violations} (or {@code
 * StageError.field_violations}).
 *
 * @param field path of the field relative to the request message, e.g. {@code "stage.user_prompt"}
 * @param description why the value is invalid
 */
public record FieldViolation(String field, String description) implements java.io.Serializable {

  static FieldViolation of(com.google.rpc.BadRequest.FieldViolation violation) {
    return new FieldViolation(violation.getField(), violation.getDescription());
  }
}
