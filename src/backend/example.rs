//! A deterministic instance of a JSON Schema: what the `echo` backend
//! answers for structured output and tool arguments, so that a frontend can
//! be built against the shapes without a model. Strings take the user's
//! text; numbers their lowest allowed value; arrays their fewest items (at
//! least one); objects every property.

use serde_json::{Map, Value, json};

/// References deeper than this give `null`: a recursive schema ends.
const MAX_DEPTH: usize = 16;

pub fn instance(schema: &Value, text: &str) -> Value {
    Walker { root: schema, text }.walk(schema, 0)
}

struct Walker<'a> {
    root: &'a Value,
    text: &'a str,
}

impl Walker<'_> {
    fn walk(&self, schema: &Value, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        if let Some(reference) = schema["$ref"].as_str() {
            return match self.resolve(reference) {
                Some(target) => self.walk(target, depth + 1),
                None => Value::Null,
            };
        }
        if let Some(constant) = schema.get("const") {
            return constant.clone();
        }
        if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
            return first.clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(first) = schema[key].as_array().and_then(|e| e.first()) {
                return self.walk(first, depth + 1);
            }
        }
        let kind = match &schema["type"] {
            Value::String(kind) => kind.as_str(),
            Value::Array(kinds) => kinds
                .iter()
                .filter_map(Value::as_str)
                .find(|k| *k != "null")
                .unwrap_or("null"),
            _ if schema.get("properties").is_some() => "object",
            _ if schema.get("items").is_some() => "array",
            _ => "string",
        };
        match kind {
            "object" => {
                let mut object = Map::new();
                if let Some(properties) = schema["properties"].as_object() {
                    for (name, property) in properties {
                        object.insert(name.clone(), self.walk(property, depth + 1));
                    }
                }
                Value::Object(object)
            }
            "array" => {
                let min = schema["minItems"].as_u64().unwrap_or(1).max(1);
                let count = schema["maxItems"].as_u64().map_or(min, |max| min.min(max));
                let item = self.walk(&schema["items"], depth + 1);
                Value::Array(vec![item; count as usize])
            }
            "integer" => json!(bound(schema, 1.0).round() as i64),
            "number" => json!(bound(schema, f64::EPSILON)),
            "boolean" => json!(true),
            "null" => Value::Null,
            _ => json!(self.string(schema)),
        }
    }

    fn string(&self, schema: &Value) -> String {
        let mut text = match schema["format"].as_str() {
            Some("date") => "2024-01-01".to_owned(),
            Some("date-time") => "2024-01-01T00:00:00Z".to_owned(),
            Some("email") => "user@example.com".to_owned(),
            Some("uri") => "https://example.com/".to_owned(),
            _ => self.text.to_owned(),
        };
        if let Some(max) = schema["maxLength"].as_u64() {
            text = text.chars().take(max as usize).collect();
        }
        if let Some(min) = schema["minLength"].as_u64() {
            while (text.chars().count() as u64) < min {
                text.push('x');
            }
        }
        text
    }

    /// `#/$defs/Name` and other local pointers into the root schema.
    fn resolve(&self, reference: &str) -> Option<&Value> {
        let pointer = reference.strip_prefix('#')?;
        self.root.pointer(pointer)
    }
}

/// The lowest value the schema allows (0 when it allows it), clamped to
/// its maximum; `step` is how far above an exclusive minimum to go.
fn bound(schema: &Value, step: f64) -> f64 {
    let low = match (
        schema["minimum"].as_f64(),
        schema["exclusiveMinimum"].as_f64(),
    ) {
        (_, Some(exclusive)) => exclusive + step,
        (Some(min), None) => min,
        (None, None) => 0.0,
    };
    let value = match schema["multipleOf"].as_f64().filter(|m| *m > 0.0) {
        Some(multiple) => (low / multiple).ceil() * multiple,
        None => low,
    };
    match schema["maximum"].as_f64() {
        Some(max) if value > max => max,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_follows_refs_bounds_and_enums() {
        let schema = json!({
            "$defs": {"City": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 5},
                "population": {"type": "integer", "minimum": 10},
                "kind": {"enum": ["capital", "town"]},
            }}},
            "type": "object",
            "properties": {
                "cities": {"type": "array", "items": {"$ref": "#/$defs/City"}, "minItems": 2},
                "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "ok": {"type": ["boolean", "null"]},
            },
        });
        let value = instance(&schema, "Paris, France");
        let city = json!({"name": "Paris", "population": 10, "kind": "capital"});
        assert_eq!(value["cities"], json!([city, city]));
        assert!(value["score"].as_f64().is_some_and(|s| s > 0.0 && s <= 1.0));
        assert_eq!(value["ok"], json!(true));
    }

    #[test]
    fn a_recursive_schema_ends() {
        let schema = json!({"$defs": {"Node": {"type": "object",
            "properties": {"next": {"$ref": "#/$defs/Node"}}}}, "$ref": "#/$defs/Node"});
        assert!(instance(&schema, "x").is_object());
    }
}
